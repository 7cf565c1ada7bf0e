"""`cluster`: serve, render, plan, demo and bench from one entry point.

cluster demo [--exit]                   local cluster on cpu-tiny + a real chat completion
cluster serve [--profile P | --config F] [--port N]
cluster render [--profile P | --config F] [--format serve|helm-values]
cluster plan [--profile P | --config F]  memory arithmetic (all GPU profiles by default)
cluster plan --trace F --profile P --gpu-hour-price USD [--slo 0.99]   capacity plan on a trace
cluster bench <name> ...                 benchmarks (bench/)
cluster doctor --release R [-n NS]       what is wrong with a release on Kubernetes, and the runbook
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from cluster.memory import GiB
from cluster.profiles import PROFILES, load_profile

DEFAULT_PROFILE = "cpu-tiny"


def load_config(profile: str | None, config: str | None) -> ClusterConfig:
    """The config of a profile or a YAML file; a refused config exits with its arithmetic."""
    try:
        if config:
            return ClusterConfig.from_file(Path(config))
        return load_profile(profile or DEFAULT_PROFILE)
    except (ValueError, KeyError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _add_config_args(p: argparse.ArgumentParser, default_profile: str | None = DEFAULT_PROFILE) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--profile", choices=sorted(PROFILES), default=default_profile, help="named profile")
    g.add_argument("--config", metavar="FILE", help="ClusterConfig YAML file")


# ---- render ---------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.config)
    if args.format == "helm-values":
        from cluster.ops.helm_values import render_helm_values_yaml  # the Helm chart's values

        sys.stdout.write(render_helm_values_yaml(cfg))
        return 0
    from deployments.serve_config import render_serve_config_yaml

    sys.stdout.write(render_serve_config_yaml(cfg))
    return 0


# ---- plan -----------------------------------------------------------------------------


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan_table(cfg: ClusterConfig) -> str:
    """One row per pool: the memory arithmetic of one engine replica."""
    headers = [
        "pool",
        "TP",
        "max_model_len",
        "weights/device GiB",
        "KV B/token",
        "KV tokens/replica",
        "KV blocks",
        "max concurrent full-length seqs",
    ]
    rows = []
    for pool in cfg.pools:
        p = cfg.memory_plan(pool)
        rows.append(
            [
                pool.name,
                str(p.tensor_parallel_size),
                f"{p.max_model_len:,}",
                f"{p.weight_bytes_per_device / GiB:.1f}" if p.accelerator == "gpu" else "(RAM)",
                f"{p.kv_bytes_per_token:,}",
                f"{p.kv_tokens_per_replica:,}",
                f"{p.kv_blocks_per_replica:,}",
                f"{p.max_concurrent_full_sequences:,}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    arch = cfg.model.architecture
    node = cfg.node
    head = f"profile {cfg.profile}: {_params(arch.param_count())} params, weights {cfg.model.weight_dtype}; " + (
        f"node {node.gpus_per_node}x {node.gpu_product} {node.gpu_memory_gib:g} GiB"
        if node.accelerator == "gpu"
        else f"CPU node, {node.cpus_per_node} cores"
    )
    explain = [f"  {cfg.memory_plan(p).explain()}" for p in cfg.pools]
    return "\n".join([head, *out, *explain])


def cmd_capacity_plan(args: argparse.Namespace) -> int:
    """Replicas, GPU-hours and $ per 1M tokens that meet the SLO on a trace (simulated)."""
    import json

    from bench.sim.autoscale_eval import load_window  # the simulator: imported only here
    from bench.sim.capacity_plan import format_plan, plan
    from bench.sim.traffic_shapes import apply_shape, make_shape

    cfg = load_config(args.profile or "h100x8-bf16", args.config)
    if args.gpu_hour_price is None or args.gpu_hour_price <= 0:
        raise SystemExit("error: --gpu-hour-price (USD per GPU-hour, > 0) is needed with --trace")
    if not 0 < args.slo <= 1:
        raise SystemExit(f"error: --slo is the fraction of requests that must meet the SLO, got {args.slo}")
    try:
        trace = apply_shape(load_window(args.trace, args.limit, args.window_min), make_shape(args.shape))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if not trace.requests:
        raise SystemExit("error: no requests in the trace window")
    print(plan_table(cfg))
    print(f"\ncapacity plan: simulating {trace.name} ({len(trace):,} requests) ...", flush=True)
    result = plan(cfg, trace, price=args.gpu_hour_price, slo_target=args.slo, router=args.router)
    print()
    print(format_plan(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
        print(f"wrote {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.trace:
        return cmd_capacity_plan(args)
    if args.config or args.profile:
        print(plan_table(load_config(args.profile, args.config)))
        return 0
    for i, name in enumerate(n for n in PROFILES):
        if i:
            print()
        print(plan_table(load_profile(name)))
    return 0


# ---- serve / demo -----------------------------------------------------------------------


def _wait_for_ctrl_c(message: str) -> None:
    print(message, flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.ops.local import start_local_cluster

    cfg = load_config(args.profile, args.config)
    port = args.port or cfg.http_port
    cluster = start_local_cluster(cfg, http_port=port)
    try:
        _wait_for_ctrl_c(
            f"serving `{cfg.model.served_name}` at {cluster.base_url}/v1 (OpenAI API); Ctrl-C stops the cluster"
        )
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.stop()
    return 0


def run_demo(base_url: str, served_name: str, n_steady: int = 20) -> dict[str, float]:
    """A real chat completion (whole and streamed) through the official openai client,
    then `n_steady` short completions for a p50. Returns timings in seconds."""
    import logging

    import openai

    # Ray's logging setup in this (driver) process would print every client HTTP call.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed-auth-is-off")
    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "In one sentence: what does a KV cache store?"},
    ]
    print(f"\n>>> POST {base_url}/v1/chat/completions  model={served_name}")
    print(f"    user: {messages[-1]['content']}")
    t = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model=served_name, messages=messages, max_tokens=24)  # type: ignore[arg-type]
    first = time.perf_counter() - t
    reply = raw.parse()
    print(f"<<< {reply.choices[0].message.content!r}")
    print(
        f"    pool={raw.headers.get('x-pool')} replica={raw.headers.get('x-served-by', '-')} "
        f"prompt_tokens={reply.usage.prompt_tokens if reply.usage else '?'} "
        f"completion_tokens={reply.usage.completion_tokens if reply.usage else '?'} in {first:.2f} s"
    )
    print("    (random weights: the text is noise by design; the path and the numbers are real)")
    print("\n>>> the same request, streamed:")
    t = time.perf_counter()
    ttft = None
    sys.stdout.write("<<< ")
    stream: Any = client.chat.completions.create(
        model=served_name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=24,
        stream=True,
    )
    for chunk in stream:
        if ttft is None:
            ttft = time.perf_counter() - t
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
    stream_s = time.perf_counter() - t
    print(f"\n    first chunk after {ttft or 0:.3f} s, done after {stream_s:.2f} s")
    lat = []
    for i in range(n_steady):
        t = time.perf_counter()
        client.chat.completions.create(
            model=served_name,
            messages=[{"role": "user", "content": f"Say hello number {i}."}],
            max_tokens=8,
        )
        lat.append(time.perf_counter() - t)
    p50 = statistics.median(lat)
    print(f"\n{n_steady} short chat completions (8 tokens): p50 {p50 * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms")
    return {"first_request_s": first, "stream_s": stream_s, "ttft_s": ttft or 0.0, "steady_p50_s": p50}


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.ops.local import start_local_cluster

    cfg = load_config(args.profile, None)
    cluster = start_local_cluster(cfg, http_port=args.port or cfg.http_port)
    try:
        timings = run_demo(cluster.base_url, cfg.model.served_name)
        print(
            f"\ntimings: cold start {cluster.ready_after_s or 0:.0f} s, "
            f"first request {timings['first_request_s']:.2f} s, steady p50 {timings['steady_p50_s'] * 1000:.0f} ms"
        )
        if not args.exit:
            _wait_for_ctrl_c(
                f"\nserving at {cluster.base_url}/v1 -- try:\n"
                f"  curl {cluster.base_url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                f'    -d \'{{"model": "{cfg.model.served_name}", '
                f'"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 16}}\'\n'
                "Ctrl-C stops the cluster."
            )
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.stop()
    return 0


# ---- doctor ---------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0: nothing found, 1: warnings only, 2: a critical finding, 3: cluster unreadable."""
    from cluster.ops.doctor import ClusterSnapshot, diagnose, report

    if args.from_file:
        snap = ClusterSnapshot.load(Path(args.from_file))
    else:
        from cluster.ops.doctor_collect import ClusterUnreachable, collect

        try:
            snap = collect(args.namespace, args.release, context=args.context, name=args.name)
        except ClusterUnreachable as exc:
            print(f"cluster doctor: cannot read the cluster: {exc}", file=sys.stderr)
            return 3
    if args.save:
        Path(args.save).write_text(json.dumps(snap.to_json(), indent=1) + "\n")
    findings = diagnose(snap)
    print(report(snap, findings))
    if any(f.severity == "critical" for f in findings):
        return 2
    return 1 if findings else 0


# ---- usage ------------------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> int:
    """Per-tenant usage of one UTC day from Redis (chargeback), as JSON lines."""
    import asyncio
    import json

    from cluster.admission.limiter import TenantLimiter, utc_day

    cfg = load_config(args.profile, args.config)
    if args.redis_url:
        cfg.sessions.redis_url, cfg.sessions.redis_url_env = args.redis_url, None
    day = args.day or utc_day()

    async def read() -> list[dict[str, object]]:
        limiter = TenantLimiter.from_config(cfg)
        try:
            return [{"tenant": t, "day": day, **await limiter.usage(t, day)} for t in args.tenant]
        finally:
            await limiter.aclose()

    for row in asyncio.run(read()):
        print(json.dumps(row))
    return 0


# ---- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster", description="Mistral Large 2 on Ray Serve + vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the cluster locally from a profile or a config file")
    _add_config_args(p)
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's http_port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("render", help="print the Ray Serve config YAML (serve deploy / RayService)")
    _add_config_args(p)
    p.add_argument("--format", choices=["serve", "helm-values"], default="serve")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("plan", help="memory arithmetic of a profile; with --trace, a capacity plan")
    _add_config_args(p, default_profile=None)
    p.add_argument("--trace", default=None, help="Mooncake JSONL or Azure CSV: plan capacity on it (simulated)")
    p.add_argument("--gpu-hour-price", type=float, default=None, help="USD per GPU-hour (with --trace)")
    p.add_argument("--slo", type=float, default=0.99, help="fraction of requests that must meet the per-request SLO")
    p.add_argument("--shape", default="flat", help="traffic shape: flat, diurnal, burst, ramp")
    p.add_argument("--router", default=None, help="routing policy (default: the config's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N requests")
    p.add_argument("--window-min", default=None, help="START:END minutes of the trace")
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="start the local cluster on cpu-tiny and show a real chat completion")
    p.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--exit", action="store_true", help="stop after the demo instead of serving on")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="diagnose a release on Kubernetes and name the runbook to open")
    p.add_argument("--release", default="mls", help="Helm release name (default: mls)")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    p.add_argument("--name", default=None, help="RayService name (default: the chart's fullname)")
    p.add_argument("--save", metavar="FILE", help="also write what was read as JSON (for a ticket or a test)")
    p.add_argument("--from-file", metavar="FILE", help="diagnose a snapshot written by --save instead")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("usage", help="a tenant's usage of one UTC day (requests, prompt/completion/cached tokens)")
    _add_config_args(p)
    p.add_argument("--tenant", action="append", required=True, help="tenant name (repeat for several)")
    p.add_argument("--day", default=None, help="YYYY-MM-DD (UTC; default today)")
    p.add_argument("--redis-url", default=None, help="Redis to read (default: the config's sessions.redis_url)")
    p.set_defaults(func=cmd_usage)

    try:
        from bench.cli import register  # the benchmarks' own subcommands
    except ImportError:
        p = sub.add_parser("bench", help="benchmarks (not installed in this checkout)")
        p.set_defaults(func=lambda a: (print("bench/cli.py is missing", file=sys.stderr), 2)[1])
    else:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
