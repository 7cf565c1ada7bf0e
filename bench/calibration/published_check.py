"""The simulator against a published vLLM measurement of a Mistral Large class model.

Lambda's vLLM benchmark (bench/calibration/published_lambda_mistral_large_2407_tp8.json):
Mistral-Large-Instruct-2407 bf16 on 8x H100 SXM, TP=8, vLLM 0.5.4, max_model_len 2000,
max_num_seqs 256, 320 ShareGPT prompts sent at once; 1,734 output tok/s at a median
inter-token latency of 46 ms. This replays the same 320 requests (the recorded input and
output lengths) on one simulated h100x8-bf16 replica with those engine limits and
prints both, with the same code paths `cluster bench sim` uses (ClusterSimulator,
StepTimeModel.for_pool). The simulated engine is vLLM 0.29 (chunked prefill, async
scheduling, CUDA graphs, custom all-reduce), the published one 0.5.4, so the simulator
should come out faster; how much is the point of the check.

    cluster bench published-check      # or python -m bench.calibration.published_check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.calibration.step_time import CALIBRATION_DIR
from bench.sim.simulator import ClusterSimulator, default_step_time
from bench.traces import Trace, TraceRequest
from cluster.config import ClusterConfig, PoolConfig
from cluster.profiles import load_profile

PUBLISHED = CALIBRATION_DIR / "published_lambda_mistral_large_2407_tp8.json"
BLOCK = 16  # vLLM's block: ShareGPT prompts share no prefix worth a block


class RecordingStepTime:
    """A step-time model that also records each step's duration and decoding sequences
    (the simulator calls step_ms once per engine step, with that step's arguments)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps: list[tuple[float, int]] = []

    def step_ms(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_tokens: int) -> float:
        ms = float(self.inner.step_ms(prefill_chunks, num_decode, decode_kv_tokens))
        self.steps.append((ms, num_decode))
        return ms

    def describe(self) -> str:
        return str(self.inner.describe())


def weighted_median(pairs: Sequence[tuple[float, int]]) -> float:
    """Median of values each counted `weight` times."""
    items = sorted((v, w) for v, w in pairs if w > 0)
    total = sum(w for _, w in items)
    if not total:
        return float("nan")
    acc = 0
    for v, w in items:
        acc += w
        if 2 * acc >= total:
            return v
    return items[-1][0]


def engine_config(profile: str, max_num_seqs: int, max_model_len: int) -> ClusterConfig:
    """The profile's first pool with the published engine limits, as the only pool."""
    cfg = load_profile(profile)
    data = cfg.to_dict()
    pool = dict(data["pools"][0])
    pool["max_model_len"] = max_model_len
    pool["engine"] = dict(pool["engine"], max_num_seqs=max_num_seqs)
    data["pools"] = [pool]
    return ClusterConfig.model_validate(data)


def run_check(
    profile: str = "h100x8-bf16", path: Path = PUBLISHED, async_scheduling: bool = True, **factory_kw: Any
) -> dict[str, Any]:
    pub = json.loads(path.read_text())
    args = pub["setup"]["server_args"]
    cfg = engine_config(profile, args["max_num_seqs"], args["max_model_len"])
    reqs = []
    next_id = 0
    for i, (p, o) in enumerate(zip(pub["input_lens"], pub["output_lens"], strict=True)):
        n = -(-p // BLOCK)
        # An empty reply still costs the prefill and one sampled token.
        reqs.append(TraceRequest(f"q{i}", 0.0, max(1, p), max(1, o), tuple(range(next_id, next_id + n))))
        next_id += n
    trace = Trace("lambda-sharegpt-320", BLOCK, reqs)
    recorders: list[RecordingStepTime] = []

    def factory(c: ClusterConfig, pool: PoolConfig) -> RecordingStepTime:
        rec = RecordingStepTime(default_step_time(c, pool, **factory_kw))
        recorders.append(rec)
        return rec

    pool_name = cfg.pools[0].name
    sim = ClusterSimulator(
        cfg,
        trace,
        policy="round-robin",
        replicas={pool_name: 1},
        step_time_factory=factory,
        async_scheduling=async_scheduling,
        decode_runs=False,  # every step through step_ms, so the recorder sees each
    )
    res = sim.run(check=True)
    steps = recorders[0].steps
    duration = max(res.finish)
    out_tokens = sum(pub["output_lens"])  # the published count (empty replies as 0)
    tpot = [
        (f - t) / (o - 1) * 1e3 for f, t, o in zip(res.finish, res.first_token, res.output_tokens, strict=True) if o > 1
    ]
    sim_fig = {
        "duration_s": duration,
        "output_throughput_tok_s": out_tokens / duration,
        "median_ttft_ms": statistics.median(res.first_token) * 1e3,
        "median_tpot_ms": statistics.median(tpot),
        # The client's inter-token latency is the step each decoded token came from.
        "median_itl_ms": weighted_median(steps),
        "steps": len(steps),
        "max_running": max(n for _, n in steps),  # decoding sequences in the fullest step
    }
    return {"published": pub["figures"], "simulated": sim_fig, "notes": sim.step_time_notes}


def format_check(result: dict[str, Any]) -> str:
    pub, sim = result["published"], result["simulated"]
    rows = [("output tok/s", "output_throughput_tok_s", "{:,.0f}")]
    rows += [
        (k.removeprefix("median_").removesuffix("_ms") + " p50 (ms)", k, "{:,.1f}")
        for k in ("median_itl_ms", "median_tpot_ms", "median_ttft_ms")
    ]
    rows.append(("duration (s)", "duration_s", "{:,.1f}"))
    lines = [f"{'':<18} {'published':>10} {'simulated':>10} {'sim/pub':>8}"]
    for label, key, fmt in rows:
        p, s = pub[key], sim[key]
        lines.append(f"{label:<18} {fmt.format(p):>10} {fmt.format(s):>10} {s / p:>8.2f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="h100x8-bf16")
    parser.add_argument("--allreduce-scaling", default=None, help="vllm (default), ring or flat-latency")
    parser.add_argument("--step-overhead-ms", type=float, default=None)
    parser.add_argument("--sync-scheduling", action="store_true")


def run(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {}
    if args.allreduce_scaling:
        kw["allreduce_scaling"] = args.allreduce_scaling
    if args.step_overhead_ms is not None:
        kw["step_overhead_ms"] = args.step_overhead_ms
    result = run_check(args.profile, async_scheduling=not args.sync_scheduling, **kw)
    print(format_check(result))
    for note in result["notes"]:
        print(f"  {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
