"""`cluster bench sim`: compare routing policies on a trace with the cluster simulator.

    cluster bench sim --trace ../shared/traces/mooncake_conversation.jsonl \\
        --replicas 16 --profile h100x8-bf16 --policy all --rate-scale 1,2 --out out/sim

Runs every (policy, rate scale) pair, in parallel processes (`--jobs`), and writes
results.json (every figure, per pool and per replica), table.txt, latency_vs_load.png,
hit_rate.png and, with a goodput search, slo_attainment.png into --out. `--replicas` is
the total, shared among the profile's pools by the tokens the trace sends to each
(override with --pool-replicas, or put every replica in one pool with --pool). The
throughput ceiling of one replica: --replicas 1 --pool standard --rate-scale 50
(everything queued at once). `--seeds N` runs every pair
with N seeds and reports the mean (`bench/sim/seeds.py`): policies with random tie-breaks
give a different run per seed, a spread one run cannot show.

`--ceiling POLICIES` also searches the goodput of fleets no router can beat, routed by
those policies (`--ceiling-cache`, `ClusterSimulator(cache=...)`): "perfect", where every
replica computes each prompt's longest prefix seen earlier in the trace for free, as if
it cached everything; "pooled", where each request is admitted with the longest prefix
cached on any replica of its pool, as if read from there (real cache capacity, every
request as if on the holder of its prefix while the load is balanced). A router can give
a replica no hit it would not have there, so the best of these is an upper estimate of
the load any router carries within the SLO: how much goodput a routing policy can still
win.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

from bench.traces import SyntheticSpec, Trace, infer_reply_blocks, read_trace, synthetic_multiturn

# What forked workers read (set before the pool starts; fork shares it without pickling).
_JOB: dict[str, Any] = {}
# A run label of one of these prefixes routes that ceiling fleet by the policy after it.
CEILINGS = {"perfect": "perfect-reuse/", "pooled": "pooled-cache/"}


def _split_label(label: str) -> tuple[str, str]:
    """(policy, cache mode) of a run label."""
    for cache, prefix in CEILINGS.items():
        if label.startswith(prefix):
            return label.removeprefix(prefix), cache
    return label, "own"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Mooncake JSONL or Azure CSV path, or 'synthetic'")
    p.add_argument("--profile", default="h100x8-bf16", help="deployment profile (cluster.profiles)")
    p.add_argument("--config", default=None, help="a ClusterConfig YAML instead of --profile")
    p.add_argument("--replicas", type=int, default=16, help="engine replicas in total (default 16)")
    p.add_argument("--pool-replicas", default=None, help="per pool, e.g. standard=12,long=4 (overrides --replicas)")
    p.add_argument("--pool", default=None, help="put all --replicas in this one pool")
    p.add_argument("--policy", default="all", help="'all' or a comma list of routing policies")
    p.add_argument("--rate-scale", default="1.0", help="arrival-rate multipliers, comma list (e.g. 0.5,1,2)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run every (policy, rate scale) with seeds --seed .. --seed+N-1 and report the mean "
        "(policies with random tie-breaks differ from seed to seed; per-seed figures in results.json)",
    )
    p.add_argument("--stats-period", type=float, default=None, help="routing-stats period in s (0 = exact)")
    p.add_argument("--no-spill", action="store_true", help="never spill a saturated pool into a larger one")
    p.add_argument("--block-size", type=int, default=512, help="block size for Azure/synthetic traces")
    p.add_argument("--synthetic-conversations", type=int, default=2000)
    p.add_argument("--synthetic-rate", type=float, default=1.0, help="new conversations per second")
    p.add_argument(
        "--synthetic-spec",
        default=None,
        help="more SyntheticSpec fields as name=value pairs, e.g. "
        "system_prompts=32,mean_output_tokens=64,arrival_shape=0.25",
    )
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--out", default="out/sim", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--no-reply-reuse",
        action="store_true",
        help="do not infer reply blocks from later turns (replies then never hit the cache)",
    )
    p.add_argument("--slo-ttft-s", type=float, default=2.0, help="SLO: TTFT budget floor in s (default 2)")
    p.add_argument(
        "--slo-ttft-floor-x",
        type=float,
        default=1.5,
        help="SLO: TTFT may also reach this multiple of the request's no-cache floor (default 1.5)",
    )
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="SLO: mean TPOT budget in ms (default 100)")
    p.add_argument("--slo-target", type=float, default=0.90, help="attainment that counts as goodput (default 0.9)")
    p.add_argument(
        "--goodput",
        default=None,
        help="'all' or a comma list of policies: bisect each one's SLO goodput (largest rate scale "
        "with attainment >= --slo-target), starting from the sweep's runs",
    )
    p.add_argument(
        "--ceiling",
        default=None,
        help="'all' or a comma list of policies: also bisect the SLO goodput of the --ceiling-cache "
        "fleets (a prefix cached elsewhere computed for free) routed by each, an upper estimate of "
        "what any router carries",
    )
    p.add_argument(
        "--ceiling-cache",
        default="perfect",
        help="the --ceiling fleets, a comma list: 'perfect' (every prefix seen earlier is cached "
        "everywhere) and/or 'pooled' (any replica of the pool's cache is readable by all)",
    )
    p.add_argument("--goodput-max", type=float, default=8.0, help="largest rate scale the goodput search tries")
    p.add_argument("--goodput-tol", type=float, default=0.05, help="relative precision of the goodput search")
    p.add_argument("--sync-scheduling", action="store_true", help="vLLM's synchronous scheduler instead of async")


def _load_cfg(args: argparse.Namespace) -> Any:
    from cluster.config import ClusterConfig
    from cluster.profiles import load_profile

    return ClusterConfig.from_file(args.config) if args.config else load_profile(args.profile)


def _load_trace(args: argparse.Namespace) -> Trace:
    if args.trace == "synthetic":
        spec = SyntheticSpec(
            conversations=args.synthetic_conversations,
            conversation_rate_per_s=args.synthetic_rate,
            block_size=args.block_size,
            seed=args.seed,
            **_parse_spec(args.synthetic_spec),
        )
        trace = synthetic_multiturn(spec)
    else:
        trace = read_trace(args.trace, block_size=args.block_size)
    trace = trace.head(args.limit) if args.limit else trace
    if not args.no_reply_reuse and trace.has_prefix_info:
        trace, _ = infer_reply_blocks(trace)
    return trace


def _parse_spec(text: str | None) -> dict[str, Any]:
    """name=value pairs for SyntheticSpec, each value parsed as the field's type."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(SyntheticSpec)}
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in fields or not value.strip():
            raise ValueError(f"--synthetic-spec wants name=value pairs of {sorted(fields)}, got {part!r}")
        default = fields[name].default
        out[name] = float(value) if isinstance(default, float) else int(value)
    return out


def _parse_pool_replicas(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if not n.strip().isdigit():
            raise ValueError(f"--pool-replicas wants name=N pairs, got {part!r}")
        out[name.strip()] = int(n)
    return out


def _run_one(policy: str, rate_scale: float, seed: int, run_index: int) -> dict[str, Any]:
    from bench.sim.metrics import summarize
    from bench.sim.simulator import ClusterSimulator

    job = _JOB
    progress_q = job.get("progress")
    trace = job["trace"].scaled(rate_scale) if rate_scale != 1.0 else job["trace"]
    name, cache = _split_label(policy)
    sim = ClusterSimulator(
        job["cfg"],
        trace,
        policy=name,
        replicas=job["replicas"],
        seed=seed,
        stats_period_s=job["stats_period"],
        spill=job["spill"],
        async_scheduling=job["async_scheduling"],
        cache=cache,
    )
    last = [0]

    def progress(done: int) -> None:
        if progress_q is not None and (done - last[0] >= 250 or done == len(trace)):
            progress_q.put(done - last[0])
            last[0] = done

    summary = summarize(sim.run(progress), job["floors"], job["slo"])
    summary["policy"] = policy
    summary["rate_scale"] = rate_scale
    summary["seed"] = seed
    summary["arrival_rate_req_s"] = len(trace) / trace.duration_s if trace.duration_s else float("nan")
    summary["step_time_notes"] = sim.step_time_notes
    summary["run_index"] = run_index
    return summary


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    return float(np.percentile(a, q)) if a.size else float("nan")


def _run_tasks(tasks: list[tuple[str, float]], jobs: int, n_requests: int, desc: str) -> list[dict[str, Any]]:
    """Run (policy, rate scale) pairs, each with every seed of the job, in `jobs` forked
    processes; one row per pair (the mean over the seeds, `bench.sim.seeds`), in task order."""
    from tqdm import tqdm

    from bench.sim.seeds import fold

    runs = [(p, s, seed) for p, s in tasks for seed in _JOB["seeds"]]
    rows: list[dict[str, Any]] = []
    total = len(runs) * n_requests
    jobs = max(1, min(jobs, len(runs)))
    # Also on a log file (no TTY): a line every 15 s instead of a live bar.
    tty = sys.stderr.isatty()
    with tqdm(total=total, unit="req", desc=desc, file=sys.stderr, mininterval=0.5 if tty else 15) as bar:
        if jobs == 1:
            q: Any = queue.SimpleQueue()
            _JOB["progress"] = q
            for k, (p, s, seed) in enumerate(runs):
                rows.append(_run_one(p, s, seed, k))
                while not q.empty():
                    bar.update(q.get())
        else:
            ctx = mp.get_context("fork")  # workers inherit the parsed trace
            mq = ctx.Queue()
            _JOB["progress"] = mq  # inherited by the forked workers
            with ctx.Pool(jobs) as pool:
                pending = [pool.apply_async(_run_one, (p, s, seed, k)) for k, (p, s, seed) in enumerate(runs)]
                while pending:
                    try:
                        bar.update(mq.get(timeout=0.5))
                    except queue.Empty:
                        pass
                    still = []
                    for r in pending:
                        if r.ready():
                            rows.append(r.get())
                        else:
                            still.append(r)
                    pending = still
                while True:
                    try:
                        bar.update(mq.get_nowait())
                    except queue.Empty:
                        break
    rows.sort(key=lambda r: r["run_index"])
    return fold(rows)


def _search_goodput(
    policies: list[str], sweep: list[dict[str, Any]], args: argparse.Namespace, n_requests: int
) -> dict[str, Any]:
    """Bisect every policy's SLO goodput side by side: each round runs one probe per
    policy still searching, in parallel."""
    from bench.sim.goodput import GoodputSearch

    searches = {
        p: GoodputSearch(
            target=args.slo_target,
            lo=min(0.25, *(r["rate_scale"] for r in sweep)) if sweep else 0.25,
            hi=args.goodput_max,
            tol=args.goodput_tol,
            known={r["rate_scale"]: r["slo_attainment"] for r in sweep if r["policy"] == p},
        )
        for p in policies
    }
    probe_rows: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    rounds = 0
    while True:
        todo = [(p, s) for p, gs in searches.items() if (s := gs.next_probe()) is not None]
        if not todo:
            break
        rounds += 1
        for row in _run_tasks(todo, args.jobs, n_requests, f"goodput round {rounds}"):
            row["goodput_probe"] = True
            searches[row["policy"]].record(row["rate_scale"], row["slo_attainment"])
            probe_rows[row["policy"]].append(row)
    out: dict[str, Any] = {}
    for p, gs in searches.items():
        g = gs.result()
        out[p] = {
            "rate_scale": g.rate_scale,
            "bounded": g.bounded,
            "probes": {f"{s:g}": a for s, a in sorted(g.probes.items())},
            "_rows": probe_rows[p],
        }
    return out


def ceiling_rate_scales(ceiling: dict[str, Any]) -> dict[str, float]:
    """Per ceiling fleet searched (cache mode), the best goodput of its policies."""
    out: dict[str, float] = {}
    for label, g in ceiling.items():
        _, cache = _split_label(label)
        out[cache] = max(out.get(cache, 0.0), g["rate_scale"])
    return out


def format_goodput(goodput: dict[str, Any], slo: Any, ceiling: dict[str, Any] | None = None) -> str:
    """One line per policy: its goodput and the attainment of every probe; then the
    ceiling fleets', and how far the best peer is from them."""
    lines = [f"SLO goodput (largest rate scale with attainment >= {slo.target:.0%}):"]
    best_peer = max((g["rate_scale"] for p, g in goodput.items() if p != "cache-aware"), default=0.0)
    rows = sorted(goodput.items(), key=lambda kv: -kv[1]["rate_scale"])
    if ceiling:
        rows += sorted(ceiling.items(), key=lambda kv: -kv[1]["rate_scale"])
    for p, g in rows:
        mark = "" if g["bounded"] else "+ (search ceiling)"
        vs = ""
        if p == "cache-aware" and best_peer > 0:
            vs = f"  ({g['rate_scale'] / best_peer:.2f}x the best peer)"
        probes = ", ".join(f"x{s}: {a:.1%}" for s, a in g["probes"].items())
        lines.append(f"  {p:>12}: x{g['rate_scale']:g}{mark}{vs}   [{probes}]")
    described = {
        "perfect": "perfect-reuse fleet (every replica caches every prefix seen earlier)",
        "pooled": "pooled-cache fleet (each request admitted with the longest prefix cached in its pool)",
    }
    for cache, top in ceiling_rate_scales(ceiling or {}).items():
        lines.append(f"{described[cache]}: up to x{top:g}, an upper estimate of any router's goodput")
        if best_peer > 0 and top > 0:
            ours = goodput.get("cache-aware")
            share = f"cache-aware carries {ours['rate_scale'] / top:.0%} of it, " if ours else ""
            lines.append(
                f"  {share}the best peer {best_peer / top:.0%}; 1.3x the best peer would be "
                f"x{1.3 * best_peer:.4g} = {1.3 * best_peer / top:.0%} of it"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from bench.sim.metrics import format_table
    from bench.sim.simulator import split_replicas

    # Analytic step times are reported once in the summary, not once per run.
    logging.getLogger("bench.calibration.step_time").setLevel(logging.ERROR)

    try:
        cfg = _load_cfg(args)
        trace = _load_trace(args)
        scales = [float(x) for x in str(args.rate_scale).split(",") if x.strip()]
        if not scales or min(scales) <= 0:
            raise ValueError(f"--rate-scale needs positive numbers, got {args.rate_scale!r}")
        if args.seeds < 1:
            raise ValueError(f"--seeds needs at least 1, got {args.seeds}")
        from cluster.routing.registry import POLICY_NAMES

        policies = list(POLICY_NAMES) if args.policy == "all" else [p.strip() for p in args.policy.split(",")]
        goodput_policies: list[str] = []
        if args.goodput:
            goodput_policies = policies if args.goodput == "all" else [p.strip() for p in args.goodput.split(",")]
        ceiling_policies: list[str] = []
        if args.ceiling:
            ceiling_policies = policies if args.ceiling == "all" else [p.strip() for p in args.ceiling.split(",")]
        ceiling_caches = [c.strip() for c in str(args.ceiling_cache).split(",") if c.strip()]
        if not ceiling_caches or set(ceiling_caches) - set(CEILINGS):
            raise ValueError(f"--ceiling-cache wants a comma list of {sorted(CEILINGS)}, got {args.ceiling_cache!r}")
        unknown = [p for p in policies + goodput_policies + ceiling_policies if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; known: {POLICY_NAMES}")
        if args.pool_replicas:
            replicas = _parse_pool_replicas(args.pool_replicas)
        elif args.pool:
            cfg.pool(args.pool)  # KeyError names the pools
            replicas = {args.pool: args.replicas}
        else:
            replicas = split_replicas(cfg, trace, args.replicas)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(trace) == 0:
        print("error: the trace has no requests", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = trace.stats()
    print(
        f"trace {trace.name}: {len(trace):,} requests over {trace.duration_s / 60:.1f} min, "
        f"{stats.prompt_tokens / len(trace):,.0f} prompt / {stats.output_tokens / len(trace):,.0f} output tokens "
        f"per request, block hit ceiling {stats.block_hit_ceiling:.1%}"
    )
    print(f"profile {cfg.profile}: replicas {replicas}; {len(policies)} policies x {len(scales)} rate scales")
    sched = "synchronous" if args.sync_scheduling else "async (vLLM 0.29 default)"
    print(f"scheduling {sched}; reply blocks {trace.meta.get('reply_blocks', 'not inferred')}")

    from bench.sim.floor import ttft_floors
    from bench.sim.goodput import SloSpec

    slo = SloSpec(args.slo_ttft_s, args.slo_ttft_floor_x, args.slo_tpot_ms, args.slo_target)
    floors = ttft_floors(cfg, trace, replicas)
    print(
        f"TTFT floor (alone on an idle replica, perfect reuse): p50 {_pct(floors.perfect_reuse_s, 50):.2f} s, "
        f"p90 {_pct(floors.perfect_reuse_s, 90):.2f} s, p99 {_pct(floors.perfect_reuse_s, 99):.2f} s; "
        f"no cache: p50 {_pct(floors.no_cache_s, 50):.2f} s, p99 {_pct(floors.no_cache_s, 99):.2f} s"
    )
    print(
        f"SLO: TTFT <= max({slo.ttft_min_s:g} s, {slo.ttft_floor_factor:g} x no-cache floor), "
        f"mean TPOT <= {slo.tpot_mean_ms:g} ms; goodput at attainment >= {slo.target:.0%}"
    )
    _JOB.update(
        floors=floors,
        slo=slo,
        cfg=cfg,
        trace=trace,
        replicas=replicas,
        seeds=list(range(args.seed, args.seed + args.seeds)),
        stats_period=args.stats_period,
        spill=not args.no_spill,
        async_scheduling=not args.sync_scheduling,
    )
    tasks = [(p, s) for s in scales for p in policies]
    started = time.perf_counter()
    rows = _run_tasks(tasks, args.jobs, len(trace), "simulating")
    goodput: dict[str, Any] = {}
    if goodput_policies:
        goodput = _search_goodput(goodput_policies, rows, args, len(trace))
        rows += [r for g in goodput.values() for r in g.pop("_rows")]
    ceiling: dict[str, Any] = {}
    if ceiling_policies:
        labels = [CEILINGS[c] + p for c in ceiling_caches for p in ceiling_policies]
        ceiling = _search_goodput(labels, [], args, len(trace))
        rows += [r for g in ceiling.values() for r in g.pop("_rows")]
    wall = time.perf_counter() - started
    jobs = max(1, min(args.jobs, len(tasks)))
    sweep = [r for r in rows if not r.get("goodput_probe")]

    table = format_table(sweep)
    if args.seeds > 1:
        last = args.seed + args.seeds - 1
        table += f"\n(each figure the mean over seeds {args.seed}-{last}; per seed in results.json)"
    if goodput or ceiling:
        table += "\n\n" + format_goodput(goodput, slo, ceiling)
    print(table)
    cpu = [r["sim_cpu_s"] for r in rows]
    print(
        f"simulated {len(tasks) * args.seeds} runs of {len(trace):,} requests in {wall:.1f} s wall ({jobs} processes); "
        f"CPU per run {min(cpu):.1f}-{max(cpu):.1f} s, {sum(cpu):.0f} s in all"
    )
    for note in rows[0].get("step_time_notes", []):
        print(f"  {note}")
    result = {
        "trace": {"name": trace.name, "meta": trace.meta, "block_size": trace.block_size, **stats.to_dict()},
        "profile": cfg.profile,
        "replicas": replicas,
        "policies": policies,
        "rate_scales": scales,
        "seed": args.seed,
        "seeds": args.seeds,
        "stats_period_s": args.stats_period if args.stats_period is not None else cfg.router.stats_period_s,
        "spill": not args.no_spill,
        "async_scheduling": not args.sync_scheduling,
        "wall_s": wall,
        "slo": slo.to_dict(),
        "floor": {
            "ttft_p50_s": _pct(floors.perfect_reuse_s, 50),
            "ttft_p90_s": _pct(floors.perfect_reuse_s, 90),
            "ttft_p99_s": _pct(floors.perfect_reuse_s, 99),
            "nocache_ttft_p50_s": _pct(floors.no_cache_s, 50),
            "nocache_ttft_p90_s": _pct(floors.no_cache_s, 90),
            "nocache_ttft_p99_s": _pct(floors.no_cache_s, 99),
        },
        "goodput_rate_scale": {p: g["rate_scale"] for p, g in goodput.items()},
        "goodput": goodput,
        "goodput_ceiling_rate_scale": ceiling_rate_scales(ceiling),
        "goodput_ceiling": ceiling,
        "runs": sweep,
        "goodput_runs": [r for r in rows if r.get("goodput_probe")],
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "table.txt").write_text(table + "\n")
    written = [out / "results.json", out / "table.txt"]
    if not args.no_plots:
        from bench.sim.plots import plot_hit_rate, plot_latency_vs_load, plot_slo_attainment

        title = f"{trace.name}, {cfg.profile}, replicas {replicas}"
        written.append(plot_latency_vs_load(sweep, out / "latency_vs_load.png", title, result["floor"]))
        written.append(plot_hit_rate(sweep, out / "hit_rate.png", title))
        if goodput or ceiling:
            written.append(plot_slo_attainment(goodput, ceiling, out / "slo_attainment.png", title, slo.target))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster bench sim", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
