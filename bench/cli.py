"""`cluster bench <name>`: registers every benchmark module as a subcommand.

Each benchmark is a module exposing `add_arguments(parser)` and `run(args) -> int`. The
modules are imported only when their subcommand runs (their options are added on first
use of `--help` of that subcommand or on dispatch), so one benchmark with a missing
dependency or module never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

BENCHMARKS: dict[str, tuple[str, str]] = {
    "sim": ("bench.sim.cli", "compare routing policies on a trace with the cluster simulator"),
    "autoscale": ("bench.sim.autoscale_eval", "autoscaling policies on shaped traffic: GPU-hours against SLO"),
    "replay": ("bench.live.replay_cluster", "replay a scaled-down trace against the running local cluster"),
    "router": ("bench.router_latency", "routing decision latency of each policy"),
    "router-cluster": ("bench.live.router_cluster", "routing through the real cluster's request router"),
    "sessions": ("bench.live.sessions", "session store throughput and latency"),
    "chaos": (
        "bench.live.chaos",
        "streaming load while engine replicas are killed, wedged or drained; what clients saw",
    ),
    "published-check": (
        "bench.calibration.published_check",
        "the simulator against a published vLLM figure (Lambda, TP=8)",
    ),
    "engine-load": (
        "bench.calibration.engine_load",
        "one pool's engine start: default, streamed weights, compile cache cold/warm",
    ),
    "tenants": ("bench.live.tenants", "noisy neighbour: tenant B's TTFT with A flooding, fair share on/off"),
}


def _load(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"error: benchmark module {module} is not available: {e}") from e


def _dispatch(args: argparse.Namespace) -> int:
    """Entry of `cluster bench NAME ...`: parse NAME's own options and run it."""
    name = args.bench_name
    module_name, help_text = BENCHMARKS[name]
    module = _load(module_name)
    parser = argparse.ArgumentParser(prog=f"cluster bench {name}", description=help_text)
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.bench_argv)
    return int(module.run(bench_args))


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` with one sub-subcommand per benchmark to a CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks: simulator, trace replay, router, sessions")
    inner = bench.add_subparsers(dest="bench_name", metavar="BENCHMARK", required=True)
    for name, (_, help_text) in BENCHMARKS.items():
        # The benchmark parses its own options after its import, so this parser must pass
        # everything through: with an unused prefix char no argument looks like an option.
        sp = inner.add_parser(name, help=help_text, add_help=False, description=help_text, prefix_chars="\x01")
        sp.add_argument("bench_argv", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_dispatch, bench_name=name)
    bench.set_defaults(func=_dispatch)
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.cli NAME ...` without the cluster CLI around it."""
    parser = argparse.ArgumentParser(prog="bench")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
