"""`cluster bench replay`: replay a trace, scaled down in tokens and rate, against the real
cluster over HTTP, and set the result beside the simulator's prediction for the same
scaled trace, so the simulator's cache model is checked against vLLM's own counters.

    cluster bench replay \\
        --trace ../shared/traces/mooncake_conversation.jsonl --limit 300 --out out/replay

Scaling: every trace block (512 tokens for Mooncake) becomes `block_size x token_scale`
tokens (16 by default: exactly one vLLM block of the cpu-tiny engines), the partial last
block and the output length shrink by the same factor, and arrivals speed up by
`--rate-scale`. Each block id becomes a fixed pseudo-random run of token ids (seeded by
the id), so equal ids give equal tokens and the engine's prefix cache sees the trace's
reuse. Prompts go to /v1/completions as token ids (no chat template to shift blocks);
`ignore_eos` makes every request generate exactly its output length. Replies are random
text, so a later turn never contains them: the simulator's prediction drops reply
blocks too (`output_block_ids`).

Reported: TTFT / TPOT / E2E percentiles measured by the client (streaming), throughput,
the per-replica spread (from the gateway's X-Served-By header), rejections (HTTP 400
context_length_exceeded), and vLLM's prefix-cache hit rate: the increase of
`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (tokens) over the replay, read
from Ray's Prometheus endpoint (vLLM's Ray stat logger exports them there), next to the
simulator's token hit rate and the trace's ceiling.

Timing: the same table sets client TTFT and TPOT percentiles beside the simulator's
(`timing_errors`: relative errors of TTFT and TPOT p50/p90). The simulator's engines take
their step times from the profile's table (for cpu-tiny the whole engine steps measured
in vLLM, bench/calibration/engine_step_table.py), and the profile's `simulator` terms
cover what the table does not: the serving path's time per request and its growth per
request in flight, the first token's longer way back (`stream_lead_ms`), the engines'
slowdown on shared cores (`engine_step_scale`, with how long a slow spell lasts), beside
each other's steps (`engine_contention_scale`) and per sequence beyond the first
(`engine_batch_stretch`), each with its measured spread. `--engine-timing` measures those
terms from the replay itself: the engines' stat taps (deployments/engine_stats.py) keep
vLLM's own per-step and per-request timings, bench/live/engine_timeline.py matches them
to the client's requests and splits the time; `--sim-terms` simulates with the terms of
another replay, so one replay calibrates and another checks the prediction.
`--measure-overhead` measures the overhead the older way: lone requests on the idle
cluster, client TTFT minus the simulator's TTFT of the same request alone.

Without --base-url the local cluster is started here (profile cpu-tiny by default) and
stopped at the end. Run one cluster per machine at a time: the engines need the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.live import engine_timeline, prefix_counters
from bench.traces import Trace, TraceRequest, read_trace

FIRST_TOKEN_ID = 1000  # keep clear of the tokenizer's special tokens
WARM_UP_PROMPT = 48  # tokens per warm-up request
OVERHEAD_PROMPTS = (32, 96, 256)  # prompt tokens of the lone requests that measure the overhead
TIMING_KEYS = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_ms", "tpot_p90_ms")
SIM_REPEATS = 15  # seeds the simulator's timing percentiles are the median over (spreads)
ENGINE_TIMING_ROWS = (
    "client_ttft_ms",
    "engine_ttft_ms",
    "engine_prefill_ms",
    "client_overhead_ms",
    "path_in_ms",
    "path_first_token_back_ms",
    "path_last_token_back_ms",
    "stream_lead_ms",
    "engine_itl_ms",
    "engine_tpot_ms",
)


def scale_trace(
    trace: Trace,
    token_scale: float,
    rate_scale: float = 1.0,
    max_output: int | None = None,
    *,
    output_scale: float | None = None,
    min_output: int = 1,
) -> Trace:
    """The trace with blocks of round(block_size x token_scale) tokens, outputs scaled by
    `output_scale` (default: the token scale; at least min_output, at most max_output),
    arrivals `rate_scale` times as fast, and no reply blocks (a real engine's replies are
    not the trace's). A larger output scale keeps client TPOT an engine quantity: over a
    few tokens it is mostly the first token's extra way back (`stream_lead_ms`)."""
    if not 0 < token_scale <= 1:
        raise ValueError(f"token scale must be in (0, 1], got {token_scale}")
    out_scale = token_scale if output_scale is None else output_scale
    if not 0 < out_scale <= 1:
        raise ValueError(f"output scale must be in (0, 1], got {out_scale}")
    if min_output < 1 or (max_output is not None and max_output < min_output):
        raise ValueError(f"need 1 <= min_output <= max_output, got {min_output}, {max_output}")
    bt = max(1, round(trace.block_size * token_scale))
    reqs: list[TraceRequest] = []
    for r in trace.requests:
        n = len(r.block_ids)
        last = r.prompt_tokens - (n - 1) * trace.block_size
        last_scaled = min(bt, max(1, math.ceil(last * token_scale)))
        out = max(min_output, math.ceil(r.output_tokens * out_scale))
        if max_output is not None:
            out = min(out, max_output)
        reqs.append(replace(r, prompt_tokens=(n - 1) * bt + last_scaled, output_tokens=out, output_block_ids=()))
    scaled = Trace(f"{trace.name}-tokens{token_scale:g}", bt, reqs, trace.has_prefix_info, dict(trace.meta))
    return scaled.scaled(rate_scale) if rate_scale != 1.0 else scaled


def block_token_ids(block_id: int, length: int, vocab_size: int) -> list[int]:
    """The fixed tokens of one trace block (its first `length` when the block is partial)."""
    rng = random.Random(block_id)
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]


def prompt_token_ids(req: TraceRequest, block_size: int, vocab_size: int) -> list[int]:
    ids: list[int] = []
    for i, block_id in enumerate(req.block_ids):
        ids.extend(block_token_ids(block_id, min(block_size, req.prompt_tokens - i * block_size), vocab_size))
    return ids


@dataclass
class Outcome:
    index: int
    sent: float = -1.0  # seconds from replay start
    sent_wall: float = -1.0  # time.time() when sent: matches the engines' own records
    first_token: float = -1.0
    finish: float = -1.0
    completion_tokens: int = 0
    status: int = 200
    error: str = ""
    pool: str = ""
    replica: str = ""


async def _send(
    client: Any,
    model: str,
    req: TraceRequest,
    ids: list[int],
    outcome: Outcome,
    t0: float,
    gate: asyncio.Semaphore,
) -> None:
    import openai

    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    async with gate:
        outcome.sent = time.perf_counter() - t0
        outcome.sent_wall = time.time()
        try:
            async with client.completions.with_streaming_response.create(
                model=model,
                prompt=ids,
                max_tokens=req.output_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "min_tokens": req.output_tokens},
            ) as response:
                outcome.pool = response.headers.get("x-pool", "")
                outcome.replica = response.headers.get("x-served-by", "")
                stream = await response.parse()
                async for chunk in stream:
                    if chunk.choices and outcome.first_token < 0:
                        outcome.first_token = time.perf_counter() - t0
                    if chunk.usage is not None:
                        outcome.completion_tokens = chunk.usage.completion_tokens
            outcome.finish = time.perf_counter() - t0
        except openai.APIStatusError as e:
            outcome.status = e.status_code
            outcome.error = str(e)[:300]
        except openai.APIError as e:
            outcome.status = -1
            outcome.error = str(e)[:300]


async def replay(
    base_url: str,
    model: str,
    trace: Trace,
    vocab_size: int,
    max_in_flight: int = 256,
    progress: Any | None = None,
    api_key: str = "none",
) -> tuple[list[Outcome], float]:
    """Send every request at its arrival time (open loop); return outcomes and wall time."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, timeout=600, max_retries=0)
    outcomes = [Outcome(i) for i in range(len(trace))]
    gate = asyncio.Semaphore(max_in_flight)
    prompts = [prompt_token_ids(r, trace.block_size, vocab_size) for r in trace.requests]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        await _send(client, model, trace.requests[i], prompts[i], outcomes[i], t0, gate)
        if progress is not None:
            progress(1)

    try:
        await asyncio.gather(*(one(i) for i in range(len(trace))))
    finally:
        await client.close()
    return outcomes, time.perf_counter() - t0


async def warm_up(base_url: str, model: str, vocab_size: int, requests: int, api_key: str = "none") -> None:
    """A few short requests with content no trace block has, so engine start-up costs
    (first-request compilation, allocator growth) stay out of the measurement."""
    base = -(10**9)  # trace block ids are never negative
    reqs = [TraceRequest(f"warm{i}", 0.0, WARM_UP_PROMPT, 4, (base - i,)) for i in range(requests)]
    await replay_warm_up(base_url, model, Trace("warm-up", WARM_UP_PROMPT, reqs), vocab_size, api_key)


async def replay_warm_up(
    base_url: str, model: str, trace: Trace, vocab_size: int, api_key: str = "none", max_in_flight: int = 256
) -> None:
    """Replay a warm-up trace, its outcomes thrown away; RuntimeError when the cluster
    answered none of it."""
    outcomes, _ = await replay(base_url, model, trace, vocab_size, max_in_flight, api_key=api_key)
    failed = [o for o in outcomes if o.status != 200]
    if len(failed) == len(outcomes):
        raise RuntimeError(f"the cluster at {base_url} answered no {trace.name} request: {failed[0].error}")


def disjoint_twin(trace: Trace) -> Trace:
    """`trace` again, arrivals and lengths as they are, with every block id moved to one
    no trace uses (trace ids are never negative) and request ids prefixed: the same
    shapes of prefill and decode batches, sharing no block with `trace`. Replayed before
    a measured replay it warms what a few short requests do not (the CPU engine's first
    steps at each batch shape) without caching any of the measured replay's prefixes."""
    base = -(2 * 10**9)  # below warm_up's ids
    reqs = [
        replace(
            r,
            request_id=f"twin-{r.request_id}",
            block_ids=tuple(base - b for b in r.block_ids),
            output_block_ids=tuple(base - b for b in r.output_block_ids),
            session_id=f"twin-{r.session_id}" if r.session_id is not None else None,
        )
        for r in trace.requests
    ]
    return Trace(f"{trace.name}-twin", trace.block_size, reqs, trace.has_prefix_info, dict(trace.meta))


def summarize_replay(trace: Trace, outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    from bench.sim.metrics import latency_summary, spread

    ok = [o for o in outcomes if o.status == 200 and o.finish >= 0]
    rejected = [o for o in outcomes if o.status == 400]
    failed = [o for o in outcomes if o.status not in (200, 400)]
    arrival = [o.sent for o in ok]
    first = [o.first_token for o in ok]
    finish = [o.finish for o in ok]
    out_tokens = [trace.requests[o.index].output_tokens for o in ok]
    summary: dict[str, Any] = dict(latency_summary(arrival, first, finish, out_tokens))
    start = min((o.sent for o in ok), default=0.0)
    end = max((o.finish for o in ok), default=start)
    makespan = max(end - start, 1e-9)
    generated = sum(o.completion_tokens for o in ok)
    prompt = sum(trace.requests[o.index].prompt_tokens for o in ok)
    per_replica: dict[str, int] = {}
    for o in ok:
        per_replica[o.replica or "?"] = per_replica.get(o.replica or "?", 0) + 1
    summary.update(
        {
            "requests": len(outcomes),
            "completed": len(ok),
            "rejected": len(rejected),
            "failed": len(failed),
            "failures": sorted({o.error for o in failed})[:5],
            "generated_tokens": generated,
            "expected_tokens": sum(out_tokens),
            "prompt_tokens": prompt,
            "makespan_s": makespan,
            "wall_s": wall,
            "throughput_output_tok_s": generated / makespan,
            "throughput_total_tok_s": (generated + prompt) / makespan,
            "throughput_req_s": len(ok) / makespan,
            "requests_per_replica": per_replica,
            "load_spread_max_over_mean": spread(list(per_replica.values()))["max_over_mean"],
            "pools": sorted({o.pool for o in ok}),
        }
    )
    return summary


def replay_and_measure(
    base_url: str,
    metrics_url: str | None,
    cfg: Any,
    trace: Trace,
    *,
    warm_up_requests: int = 6,
    warm_up_trace: Trace | None = None,
    max_in_flight: int = 256,
    api_key: str = "none",
    progress: Any | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """Warm up (`warm_up_requests` short requests, then `warm_up_trace` where given, e.g.
    `disjoint_twin(trace)`), read vLLM's prefix-cache counters, replay, read them again
    once Ray has exported the replay's last steps. `engine_token_hit_rate` is None
    without counters."""
    model = cfg.model.served_name
    vocab = cfg.model.architecture.vocab_size
    before = (0.0, 0.0)
    if warm_up_requests:
        asyncio.run(warm_up(base_url, model, vocab, warm_up_requests, api_key))
    if warm_up_trace is not None:
        asyncio.run(replay_warm_up(base_url, model, warm_up_trace, vocab, api_key, max_in_flight))
    if metrics_url:
        # The counters are cumulative and Ray exports them every few seconds: wait until
        # everything sent before (the warm-up, earlier traffic) has arrived, so the
        # replay's delta holds the replay alone.
        before = prefix_counters.settle([metrics_url], stable_reads=3, timeout_s=60) or before
    ttft_before = _engine_ttft_totals(metrics_url) if metrics_url else None
    outcomes, wall = asyncio.run(replay(base_url, model, trace, vocab, max_in_flight, progress, api_key))
    summary = summarize_replay(trace, outcomes, wall)
    summary["engine_token_hit_rate"] = None
    if metrics_url:
        after = prefix_counters.settle(
            [metrics_url], baseline=before, expect_queries=summary["prompt_tokens"], stable_reads=4, timeout_s=60
        )
        if after is None or after[0] <= before[0]:
            print(f"warning: no vLLM prefix-cache counters at {metrics_url}", file=sys.stderr)
        else:
            summary["engine_prefix_cache_queries"] = after[0] - before[0]
            summary["engine_prefix_cache_hits"] = after[1] - before[1]
            summary["engine_token_hit_rate"] = (after[1] - before[1]) / (after[0] - before[0])
        # vLLM's own mean TTFT over the replay (engine frontend arrival -> first token):
        # the client's mean minus this is the serving path under the replay's load.
        if ttft_before is not None:
            ttft_after = _settled_ttft_totals(metrics_url, ttft_before[1] + summary["completed"], timeout_s=30)
            if ttft_after is not None and ttft_after[1] > ttft_before[1]:
                summary["engine_ttft_mean_s"] = (ttft_after[0] - ttft_before[0]) / (ttft_after[1] - ttft_before[1])
    return outcomes, summary


def engine_timing(cfg: Any, trace: Trace, outcomes: list[Outcome]) -> dict[str, Any]:
    """The replay's time split by the engines' own records (bench/live/engine_timeline.py),
    and the simulator terms measured from it (`calibration`: request overhead, stream
    lead and step scale, with their spreads). Needs this process's Ray connection."""
    from bench.calibration.cpu_flags import cpu_flags
    from bench.calibration.engine_step_table import EngineStepTable, engine_step_table_for

    timelines = engine_timeline.read_timelines([p.name for p in cfg.pools])
    scaled = engine_step_table_for(cfg, cfg.pools[0])
    # Against the table as measured alone: the scale is what this measures.
    table = EngineStepTable(scaled.table, scaled.name) if scaled is not None else None
    mean_context = trace.stats().prompt_tokens / max(1, len(trace))
    result = engine_timeline.breakdown(outcomes, timelines, table, mean_context)
    if result["matched"] and table is not None:
        result["calibration"] = engine_timeline.calibrate(result)
    if table is not None:
        # The table holds its machine's speed; the prefill scale above says how far this
        # one's prefill is from it, the flags say why (bench/calibration/cpu_flags.py).
        result["cpu_flags"] = {"here": cpu_flags(), "step_table": table.table.get("machine", {}).get("cpu_flags")}
    return result


# A prefill scale outside this range: the machine's prefill is not the table's machine's
# (AVX2-only against an AVX-512 BF16 table: 4.4-6.1; like machines: 1.22-1.45).
PREFILL_SCALE_RANGE = (0.5, 2.0)


def table_mismatch(timing: dict[str, Any]) -> str | None:
    """Why the step table may not hold this machine's speed (`engine_timing`'s measured
    prefill scale out of PREFILL_SCALE_RANGE, or CPU features other than the table's
    machine's), or None."""
    from bench.calibration.cpu_flags import flags_note

    reasons = []
    k = timing.get("engine_prefill_scale_measured")
    lo, hi = PREFILL_SCALE_RANGE
    if k is not None and not lo <= k <= hi:
        reasons.append(f"prefill steps ran x{k:g} their table cost beyond the decode steps' scale")
    flags = timing.get("cpu_flags", {})
    note = flags_note(flags.get("step_table"), flags.get("here"))
    if note:
        reasons.append(note)
    return "; ".join(reasons) or None


def apply_sim_terms(cfg: Any, terms: dict[str, Any]) -> None:
    """Set the simulator terms `engine_timing` measured (a `calibration` dict) on cfg."""
    from cluster.config import SimulatorConfig

    cfg.simulator = SimulatorConfig.model_validate({**cfg.simulator.model_dump(), **terms})


# The terms that say how fast the shared machine ran the cluster during a replay: the
# engines' steps against the table (alone and beside each other) and the
# serving path's time per request (alone and per request in flight), which shares the
# engines' cores.
MACHINE_SPEED_KEYS = (
    "engine_step_scale",
    "engine_step_scale_spread",
    "engine_step_scale_autocorr",
    "engine_contention_scale",
    "engine_batch_stretch",
    "request_overhead_ms",
    "request_overhead_spread_ms",
    "request_overhead_per_in_flight_ms",
)


def at_replay_speed(terms: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
    """`terms` (another replay's) with the machine-speed terms of the checked replay itself
    (its own `engine_timing` calibration): the engines' step scale, its spread and
    correlation, and the serving path's overhead. A prediction from another replay's terms
    also carries how much faster or slower the shared machine ran the cluster between the
    two replays (engines +-10-20% from one replay to the next here, 1.6x at worst; the
    serving path 64 against 101 ms in one CI run); simulated at the checked replay's own
    speed, what is left is the model's error: how the terms combine, the scheduler, the
    table's shape."""
    return {**terms, **{k: checked[k] for k in MACHINE_SPEED_KEYS if k in checked}}


def timing_errors(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, float]:
    """(simulated - real) / real of TTFT and TPOT p50 and p90."""
    return {k: (float(sim[k]) - float(real[k])) / float(real[k]) for k in TIMING_KEYS if float(real[k]) > 0}


def lone_request_ttft_s(cfg: Any, prompt_tokens: int, block_size: int) -> float:
    """The simulator's TTFT of one request alone on an idle replica, no prefix hit and no
    serving-path overhead: what the engine alone takes."""
    from bench.sim.simulator import ClusterSimulator

    bare = cfg.model_copy(deep=True)
    bare.simulator.request_overhead_ms = 0.0
    n = math.ceil(prompt_tokens / block_size)
    req = TraceRequest("lone", 0.0, prompt_tokens, 2, tuple(range(1, n + 1)))
    pool = next(p for p in bare.pools if prompt_tokens + 2 <= p.max_model_len)
    sim = ClusterSimulator(bare, Trace("lone", block_size, [req]), policy="round-robin", replicas={pool.name: 1})
    return sim.run().first_token[0]


def _engine_ttft_totals(metrics_url: str) -> tuple[float, float] | None:
    """(sum of seconds, count) of vLLM's own TTFT histogram over every engine."""
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = prefix_counters.prometheus_sum(text, "vllm:time_to_first_token_seconds_sum")
    count = prefix_counters.prometheus_sum(text, "vllm:time_to_first_token_seconds_count")
    return None if total is None or count is None else (total, count)


def _settled_ttft_totals(metrics_url: str, at_least: float, timeout_s: float = 60.0) -> tuple[float, float] | None:
    """The TTFT totals once their count reaches `at_least` and stops moving (Ray exports
    every few seconds); None when the endpoint has none."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = _engine_ttft_totals(metrics_url)
        if now is not None and now[1] >= at_least and now == last:
            return now
        last = now
        time.sleep(prefix_counters.POLL_S)
    return last


def measure_overhead(
    base_url: str,
    cfg: Any,
    *,
    repeats: int = 8,
    api_key: str = "none",
    prompts: tuple[int, ...] = OVERHEAD_PROMPTS,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """The serving path's time per request outside the engine, in ms: lone requests, one
    at a time on the idle cluster (fresh content, so no prefix hit), client TTFT minus
    the simulator's TTFT of the same request alone on an idle replica
    (`request_overhead_ms`, per prompt size and the median over all). With a metrics
    endpoint it is split by vLLM's own TTFT histogram (request arrival at the engine's
    frontend -> first token): `serving_path_ms` is client minus vLLM (proxy, gateway,
    router, Serve handle, the stream back), `engine_vs_table_ms` vLLM minus the simulator
    (the engine's intake before its first step, and what the step table misses)."""
    import statistics

    block = cfg.pools[0].engine.block_size
    vocab = cfg.model.architecture.vocab_size
    per_size: dict[str, Any] = {}
    excess: list[float] = []
    client_all: list[float] = []
    engine_all: list[float] = []
    before = _settled_ttft_totals(metrics_url, 0.0) if metrics_url else None
    base = -(2 * 10**9)  # block ids no trace and no warm-up uses
    for size in prompts:
        ttfts: list[float] = []
        for rep in range(repeats):
            n = math.ceil(size / block)
            ids = tuple(base - (size * 1000 + rep) * 64 - k for k in range(n))
            trace = Trace("overhead", block, [TraceRequest(f"o{size}-{rep}", 0.0, size, 2, ids)])
            outcomes, _ = asyncio.run(replay(base_url, cfg.model.served_name, trace, vocab, api_key=api_key))
            o = outcomes[0]
            if o.status == 200 and o.first_token >= 0:
                ttfts.append(o.first_token - o.sent)
        engine_s = lone_request_ttft_s(cfg, size, block)
        if ttfts:
            client = statistics.median(ttfts)
            per_size[str(size)] = {"client_ttft_ms": 1e3 * client, "simulated_engine_ttft_ms": 1e3 * engine_s}
            excess.extend(1e3 * (t - engine_s) for t in ttfts)
            client_all.extend(ttfts)
            engine_all.extend(engine_s for _ in ttfts)
    result: dict[str, Any] = {
        "request_overhead_ms": statistics.median(excess) if excess else math.nan,
        "by_prompt_tokens": per_size,
        "requests": len(excess),
    }
    if metrics_url and before is not None and client_all:
        after = _settled_ttft_totals(metrics_url, before[1] + len(client_all))
        if after is not None and after[1] > before[1]:
            vllm_mean = (after[0] - before[0]) / (after[1] - before[1])
            client_mean = statistics.fmean(client_all)
            result["vllm_ttft_mean_ms"] = 1e3 * vllm_mean
            result["client_ttft_mean_ms"] = 1e3 * client_mean
            result["serving_path_ms"] = 1e3 * (client_mean - vllm_mean)
            result["engine_vs_table_ms"] = 1e3 * (vllm_mean - statistics.fmean(engine_all))
    return result


def print_timing(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, float]:
    errors = timing_errors(real, sim)
    print(f"{'':12} {'real':>9} {'simulated':>10} {'error':>8}")
    for k in TIMING_KEYS:
        scale, unit = (1e3, "ms") if k.endswith("_s") else (1.0, "ms")
        name = k.replace("_s", "").replace("_ms", "")
        err = f"{errors[k]:+.1%}" if k in errors else "n/a"
        print(f"{name:12} {float(real[k]) * scale:>7.1f}{unit} {float(sim[k]) * scale:>8.1f}{unit} {err:>8}")
    return errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Mooncake JSONL or Azure CSV path, or 'synthetic'")
    p.add_argument("--base-url", default=None, help="a running cluster (http://host:port); default: start one here")
    p.add_argument("--metrics-url", default=None, help="Prometheus endpoint with vLLM's counters (Ray's metrics port)")
    p.add_argument("--profile", default="cpu-tiny", help="profile of the cluster (started or running)")
    p.add_argument("--config", default=None, help="a ClusterConfig YAML instead of --profile")
    p.add_argument("--limit", type=int, default=300, help="replay the first N requests (default 300)")
    p.add_argument(
        "--token-scale",
        type=float,
        default=None,
        help="token multiplier (default: one trace block becomes one engine block, e.g. 32/512)",
    )
    p.add_argument("--synthetic-conversations", type=int, default=60, help="with --trace synthetic")
    p.add_argument("--synthetic-rate", type=float, default=0.5, help="new conversations per second (synthetic)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic trace")
    p.add_argument("--rate-scale", type=float, default=1.0, help="arrival-rate multiplier")
    p.add_argument("--max-output", type=int, default=64, help="cap on scaled output tokens")
    p.add_argument("--min-output", type=int, default=1, help="floor on scaled output tokens")
    p.add_argument(
        "--output-scale",
        type=float,
        default=None,
        help="output-length multiplier (default: the token scale)",
    )
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--api-key", default="none")
    p.add_argument("--warm-up", type=int, default=6, help="warm-up requests before measuring")
    p.add_argument(
        "--warm-up-twin",
        action="store_true",
        help="first replay the trace on blocks of its own (disjoint_twin), as the e2e timing test does: the "
        "first replay after the engines start runs slower than the next",
    )
    p.add_argument("--no-sim", action="store_true", help="skip the simulator's prediction")
    p.add_argument(
        "--measure-overhead",
        action="store_true",
        help="first measure the serving path's per-request overhead (lone requests, idle cluster) and simulate with it",
    )
    p.add_argument(
        "--engine-timing",
        action="store_true",
        help="after the replay, split its time by the engines' own records and print the simulator terms measured "
        "from it (request overhead, stream lead, step scale; into replay.json as engine_timing.calibration)",
    )
    p.add_argument(
        "--sim-terms",
        default=None,
        help="a JSON of simulator terms (another replay's engine_timing.calibration, or its replay.json) to "
        "simulate with: a prediction from one replay checked on this one",
    )
    p.add_argument("--out", default="out/replay")


def _source_trace(args: argparse.Namespace) -> Trace:
    if args.trace == "synthetic":
        from bench.traces import SyntheticSpec, synthetic_multiturn

        spec = SyntheticSpec(
            conversations=args.synthetic_conversations,
            conversation_rate_per_s=args.synthetic_rate,
            seed=args.synthetic_seed,
        )
        return synthetic_multiturn(spec)
    return read_trace(args.trace)


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from bench.sim.metrics import format_table
    from cluster.config import ClusterConfig
    from cluster.profiles import load_profile

    for name in ("httpx", "httpx2", "openai"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        cfg = ClusterConfig.from_file(args.config) if args.config else load_profile(args.profile)
        full = _source_trace(args)
        engine_block = cfg.pools[0].engine.block_size
        token_scale = args.token_scale or engine_block / full.block_size
        trace = scale_trace(
            full.head(args.limit),
            token_scale,
            args.rate_scale,
            args.max_output,
            output_scale=args.output_scale,
            min_output=args.min_output,
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trace.block_size % engine_block:
        print(
            f"warning: scaled blocks of {trace.block_size} tokens are not whole engine blocks of {engine_block}; "
            "the engine caches only whole blocks, so its hit rate will fall below the simulator's",
            file=sys.stderr,
        )
    stats = trace.stats()
    print(
        f"replaying {len(trace)} requests of {args.trace} over {trace.duration_s:.0f} s: blocks of "
        f"{trace.block_size} tokens, {stats.prompt_tokens / max(1, len(trace)):.0f} prompt / "
        f"{stats.output_tokens / max(1, len(trace)):.1f} output tokens per request, token hit ceiling "
        f"{stats.token_hit_ceiling:.1%}"
    )

    cluster = None
    base_url = args.base_url
    metrics_url = args.metrics_url
    try:
        if base_url is None:
            from cluster.ops.local import start_local_cluster

            cluster = start_local_cluster(cfg)
            base_url = cluster.base_url
            metrics_url = metrics_url or next(iter(prefix_counters.metrics_urls()), None)
        overhead = None
        if args.measure_overhead:
            asyncio.run(warm_up(base_url, cfg.model.served_name, cfg.model.architecture.vocab_size, 4, args.api_key))
            overhead = measure_overhead(base_url, cfg, api_key=args.api_key, metrics_url=metrics_url)
            print(f"serving-path overhead per request: {overhead['request_overhead_ms']:.1f} ms ({overhead})")
            cfg.simulator.request_overhead_ms = overhead["request_overhead_ms"]
        timing: dict[str, Any] | None = None
        cpu_before, wall_before = engine_timeline.cluster_cpu_seconds(), time.monotonic()
        with tqdm(total=len(trace), unit="req", desc="replaying", file=sys.stderr) as bar:
            outcomes, summary = replay_and_measure(
                base_url,
                metrics_url,
                cfg,
                trace,
                warm_up_requests=args.warm_up,
                warm_up_trace=disjoint_twin(trace) if args.warm_up_twin else None,
                max_in_flight=args.max_in_flight,
                api_key=args.api_key,
                progress=bar.update,
            )
        if args.engine_timing:  # read the engines' taps while the cluster still runs
            cores = engine_timeline.cpu_delta(
                cpu_before, engine_timeline.cluster_cpu_seconds(), time.monotonic() - wall_before
            )
            try:
                timing = engine_timing(cfg, trace, outcomes)
                timing["cluster_cores_by_process"] = cores
            except RuntimeError as e:
                print(f"warning: no engine timing: {e}", file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.stop()
    engine_hit = summary["engine_token_hit_rate"]

    summary.update(
        {
            "policy": f"replay ({cfg.router.policy})",
            "rate_scale": args.rate_scale,
            "token_hit_ceiling": stats.token_hit_ceiling,
            "block_hit_ceiling": stats.block_hit_ceiling,
        }
    )
    if timing is not None:
        print("engine timing (ms, p50 / p90):")
        for key in ENGINE_TIMING_ROWS:
            if key in timing:
                print(f"  {key:28} {timing[key]['p50']:8.1f} {timing[key]['p90']:8.1f}")
        if "cluster_cores_by_process" in timing:
            print(f"  cores used during the replay, by process: {timing['cluster_cores_by_process']}")
        if "engine_prefill_scale_measured" in timing:
            flags = timing.get("cpu_flags", {})
            print(
                f"  prefill steps against the decode steps' scale: x{timing['engine_prefill_scale_measured']:g} "
                f"(CPU flags here: {flags.get('here')}; the step table's machine: {flags.get('step_table')})"
            )
        off = table_mismatch(timing)
        if off is not None:
            print(
                f"warning: {off}; profile a table on this machine "
                "(python -m bench.calibration.profile_cpu_engine) before trusting a prediction",
                file=sys.stderr,
            )
        if "calibration" in timing:
            print(f"simulator terms measured here: {json.dumps(timing['calibration'])}")
    if args.sim_terms:
        terms = json.loads(Path(args.sim_terms).read_text())
        terms = (terms.get("engine_timing") or {}).get("calibration", terms)
        apply_sim_terms(cfg, terms)
        print(f"simulating with the terms of {args.sim_terms}: {json.dumps(terms)}")
    rows = [summary]
    sim_summary = None
    speed_summary = None
    routed_summary = None
    routes = recorded_routes(trace, outcomes)
    if not args.no_sim:
        sim_summary = simulate_same(cfg, trace, repeats=SIM_REPEATS)
        sim_summary["rate_scale"] = args.rate_scale
        sim_summary["policy"] = f"simulator ({cfg.router.policy})"
        rows.append(sim_summary)
        speed_cfg = cfg
        if args.sim_terms and timing is not None and "calibration" in timing:
            speed_cfg = cfg.model_copy(deep=True)
            apply_sim_terms(speed_cfg, at_replay_speed(terms, timing["calibration"]))
            speed_summary = simulate_same(speed_cfg, trace, repeats=SIM_REPEATS)
        if len(routes) == len(trace):
            try:
                routed_summary = simulate_same(speed_cfg, trace, repeats=SIM_REPEATS, routes=routes)
            except ValueError as e:  # e.g. the real pool scaled past its start replicas
                print(f"warning: not simulated at the real routing: {e}", file=sys.stderr)

    # One unit in the table: token hit rates (vLLM counts tokens) against the token ceiling.
    shown = [dict(r, block_hit_rate=r.get("token_hit_rate"), block_hit_ceiling=stats.token_hit_ceiling) for r in rows]
    shown[0]["block_hit_rate"] = engine_hit if engine_hit is not None else float("nan")
    shown[0]["preemptions"] = "n/a"  # not visible over HTTP
    print(format_table(shown))
    print(
        "('hit' and 'ceiling' here are token hit rates: vLLM's counters for the replay, the model's for the simulator)"
    )
    print(f"vLLM prefix-cache token hit rate: {_pct(engine_hit)}")
    errors: dict[str, float] = {}
    if sim_summary is not None:
        print(f"simulator token hit rate:         {_pct(sim_summary['token_hit_rate'])}")
    print(f"ceiling (perfect reuse):          {_pct(stats.token_hit_ceiling)}")
    print(
        f"completed {summary['completed']}, rejected {summary['rejected']}, failed {summary['failed']}; "
        f"generated {summary['generated_tokens']} of {summary['expected_tokens']} expected tokens"
    )

    if sim_summary is not None:
        print(f"timing, real against simulated (request overhead {cfg.simulator.request_overhead_ms:.1f} ms):")
        errors = print_timing(summary, sim_summary)
    speed_errors: dict[str, float] = {}
    if speed_summary is not None:
        print(
            "the same at this replay's own machine speed (its engine step scale and serving-path overhead;"
            " the rest from --sim-terms):"
        )
        speed_errors = print_timing(summary, speed_summary)
    routed_errors: dict[str, float] = {}
    if routed_summary is not None:
        where = "at this replay's machine speed and " if speed_summary is not None else ""
        print(f"the same {where}with every request where the real router sent it (only the timing model compared):")
        routed_errors = print_timing(summary, routed_summary)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "trace": {"path": args.trace, "limit": args.limit, "token_scale": token_scale, **stats.to_dict()},
        "profile": cfg.profile,
        "policy": cfg.router.policy,
        "replay": summary,
        "simulator": {k: v for k, v in (sim_summary or {}).items() if k != "replica_stats"},
        "request_overhead_ms": cfg.simulator.request_overhead_ms,
        "overhead_measurement": overhead,
        "timing_errors": errors,
        "timing_errors_at_this_replay_speed": speed_errors,
        "timing_errors_at_the_real_routing": routed_errors,
        "simulator_at_the_real_routing": {k: v for k, v in (routed_summary or {}).items() if k != "replica_stats"},
        "engine_timing": timing,
        "simulator_terms": cfg.simulator.model_dump(),
        "outcomes": [o.__dict__ for o in outcomes],
    }
    (out / "replay.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out / 'replay.json'}")
    return 0 if summary["failed"] == 0 else 1


def _requests_per_replica(replica_stats: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    by_pool: dict[str, list[int]] = {}
    for r in replica_stats:
        by_pool.setdefault(r["pool"], []).append(int(r["requests"]))
    return {pool: sorted(n, reverse=True) for pool, n in by_pool.items() if sum(n)}


def recorded_routes(trace: Trace, outcomes: Sequence[Outcome]) -> dict[str, str]:
    """Request id -> the replica that served it in a replay (its X-Served-By)."""
    return {trace.requests[o.index].request_id: o.replica for o in outcomes if o.replica}


def simulate_same(cfg: Any, trace: Trace, repeats: int = 1, routes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The simulator on the same scaled trace, pools at their start replica counts. With
    measured spreads in the profile (each request and step draws its own terms), the
    timing percentiles are the median over `repeats` seeds: a trace of a few dozen
    requests has noisy percentiles, and the prediction should not be one draw's. With
    `routes` (`recorded_routes` of a replay) every request goes where the real router
    sent it (bench.sim.recorded_routes), so only the timing model is compared."""
    import logging
    import statistics

    from bench.sim.metrics import summarize
    from bench.sim.recorded_routes import RecordedRoutes
    from bench.sim.simulator import ClusterSimulator, default_policy_factory

    logging.getLogger("bench.calibration.step_time").setLevel(logging.ERROR)
    replicas = {p.name: p.start_replicas for p in cfg.pools}
    factory = default_policy_factory if routes is None else (lambda name, **_: RecordedRoutes(routes))
    runs = []
    for seed in range(max(1, repeats)):
        sim = ClusterSimulator(
            cfg, trace, policy=cfg.router.policy, replicas=replicas, seed=seed, policy_factory=factory
        )
        runs.append(summarize(sim.run()))
    out = dict(runs[0])
    for k in TIMING_KEYS:
        out[k] = statistics.median(float(r[k]) for r in runs)
    out["repeats"] = len(runs)
    # Where each seed sent the requests (per pool that got any, the most used replica
    # first): seeds can differ in routing (ties broken at random), not only in timing.
    out["requests_per_replica_by_seed"] = [_requests_per_replica(r["replica_stats"]) for r in runs]
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster bench replay", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
