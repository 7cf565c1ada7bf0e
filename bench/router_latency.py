"""`cluster bench router`: routing decision latency and prefix-index memory.

For 8 and 64 replicas, each policy's index is first filled to 1M blocks in total (each
replica's KV capacity = 1M / replicas blocks, so the index runs full and every decision
also evicts), then `choose()` is timed on a mix of requests: follow-up turns that extend
an indexed chain, new conversations on a shared system prompt, and cold prompts.
Replica loads vary per decision. Requests finish as in a serving router: once
`--in-flight` per replica are outstanding, the oldest one's `on_finished` is reported
and the index update it queues applied (untimed: the live router does both when the
finish arrives, deployments/request_router.py), so per-request state (pins, KV owed,
decode exposure) stays at its steady size.
Prints p50/p99 per policy, the cost of hashing prompts
(done once per request, outside `choose`) and the index's bytes per million blocks.

The char-tree baseline indexes block-hash sequences here (one symbol per block), as in
the simulator: 1M blocks of text would be ~64M characters.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.policy import ReplicaView, RouteRequest, RoutingPolicy
from cluster.routing.prefix_index import PrefixIndex
from cluster.routing.registry import POLICY_NAMES, make_policy

BLOCK_SIZE = 16
MASK60 = (1 << 60) - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 64], help="replica counts (default: 8 64)")
    parser.add_argument("--blocks", type=int, default=1_000_000, help="indexed blocks in total (default: 1M)")
    parser.add_argument("--decisions", type=int, default=2000, help="timed decisions per policy and size")
    parser.add_argument("--policies", nargs="+", default=POLICY_NAMES, choices=POLICY_NAMES)
    parser.add_argument("--png", default=None, help="also write a bar chart of p50/p99 to this PNG path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time decisions by the wall clock, or by this thread's CPU time (on a shared "
        "machine the wall clock's tail is mostly other processes' time slices)",
    )
    parser.add_argument("--in-flight", type=int, default=32, help="outstanding requests per replica (default 32)")


class Workload:
    """Random chains: system prompts shared across conversations, per-conversation tails."""

    def __init__(self, rng: random.Random, num_systems: int = 64, system_blocks: int = 64) -> None:
        self.rng = rng
        self.systems = [self._blocks(system_blocks) for _ in range(num_systems)]
        self.chains: list[list[int]] = []

    def _blocks(self, n: int) -> list[int]:
        return [self.rng.getrandbits(60) for _ in range(n)]

    def new_chain(self, tail_blocks: int) -> list[int]:
        chain = self.rng.choice(self.systems) + self._blocks(tail_blocks)
        self.chains.append(chain)
        return chain

    def request(self, i: int) -> RouteRequest:
        """A follow-up turn (50%), a new conversation on a system prompt (30%) or cold (20%)."""
        u = self.rng.random()
        if u < 0.5 and self.chains:
            k = self.rng.randrange(len(self.chains))
            chain = self.chains[k] + self._blocks(self.rng.randrange(4, 24))
            self.chains[k] = chain
        elif u < 0.8:
            chain = self.new_chain(self.rng.randrange(8, 64))
        else:
            chain = self._blocks(self.rng.randrange(16, 192))
        max_tokens = self.rng.randrange(2, 512)
        return RouteRequest(f"q{i}", len(chain) * BLOCK_SIZE, chain, max_tokens=max_tokens, text=None)


def fill(policy: RoutingPolicy, work: Workload, replica_ids: Sequence[str], total_blocks: int) -> int:
    """Load the policy's index with `total_blocks` blocks spread over the replicas."""
    per_replica = total_blocks // len(replica_ids)
    index: PrefixIndex | None = getattr(policy, "index", None)
    tree: Any = getattr(policy, "tree", None)
    if index is None and tree is None:
        return 0
    filled = 0
    for rid in replica_ids:
        if index is not None:
            index.set_capacity(rid, per_replica)
        held = 0
        while held < per_replica:
            chain = work.new_chain(work.rng.randrange(32, 192))
            if index is not None:
                index.insert(rid, chain)
                held = index.num_blocks(rid)
            else:
                tree.insert(tuple(chain), rid)
                held = tree.tenant_chars[rid]
        filled += held
    return filled


def views_for(rng: random.Random, replica_ids: Sequence[str], capacity: int) -> list[ReplicaView]:
    return [
        ReplicaView(
            rid,
            num_waiting=rng.randrange(0, 8),
            num_running=rng.randrange(0, 200),
            kv_usage=rng.random() * 0.95,
            kv_capacity_blocks=capacity,
            in_flight=rng.randrange(0, 3),
        )
        for rid in replica_ids
    ]


def time_policy(
    name: str, num_replicas: int, args: argparse.Namespace, adapt: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """`adapt` may alter the fresh policy before it is filled (an A/B of its index)."""
    rng = random.Random(args.seed)
    work = Workload(rng)
    replica_ids = [f"replica-{i:03d}" for i in range(num_replicas)]
    capacity = args.blocks // num_replicas
    policy = make_policy(name, block_size=BLOCK_SIZE, seed=args.seed)
    if adapt is not None:
        adapt(policy)
    t0 = time.perf_counter()
    indexed = fill(policy, work, replica_ids, args.blocks)
    fill_s = time.perf_counter() - t0
    requests = [work.request(i) for i in range(args.decisions + 200)]
    all_views = [views_for(rng, replica_ids, capacity) for _ in range(64)]
    outstanding: deque[tuple[RouteRequest, str]] = deque()
    window = max(1, getattr(args, "in_flight", 32)) * num_replicas

    # A PrefixIndex queues the chosen replica's update for after the decision (the live
    # router runs flush() once it has returned the choice): timed apart, as "update".
    # A finish queues one too, which the live router applies as it handles the finish.
    flush: Callable[[], None] = getattr(getattr(policy, "index", None), "flush", lambda: None)

    def finish_oldest() -> None:
        while len(outstanding) > window:
            req, rid = outstanding.popleft()
            policy.on_finished(req, rid, req.block_hashes)
        flush()

    for i in range(200):  # warm-up
        outstanding.append((requests[i], policy.choose(requests[i], all_views[i % 64]).replica_id))
        flush()
        finish_oldest()
    samples = []
    updates = []
    clock = time.thread_time_ns if getattr(args, "clock", "wall") == "cpu" else time.perf_counter_ns
    gc.collect()
    gc.disable()  # collector pauses are the runtime's, not the policy's
    try:
        for i in range(200, len(requests)):
            views = all_views[i % 64]
            t = clock()
            decision = policy.choose(requests[i], views)
            t1 = clock()
            flush()
            updates.append(clock() - t1)
            samples.append(t1 - t)
            outstanding.append((requests[i], decision.replica_id))
            finish_oldest()
    finally:
        gc.enable()
    both = sorted(map(sum, zip(samples, updates, strict=True)))
    samples.sort()
    updates.sort()
    return {
        "policy": name,
        "replicas": num_replicas,
        "indexed_blocks": indexed,
        "fill_s": fill_s,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
        "update_p50_us": updates[len(updates) // 2] / 1000,
        "update_p99_us": updates[int(len(updates) * 0.99)] / 1000,
        "with_update_p99_us": both[int(len(both) * 0.99)] / 1000,
    }


def measure_memory(total_blocks: int, num_replicas: int, seed: int) -> dict[str, float]:
    """Bytes per million blocks: our PrefixIndex, an OrderedDict exact LRU, the char tree."""
    rng = random.Random(seed)
    chains = []
    n = 0
    while n < total_blocks:
        chain = [rng.getrandbits(60) for _ in range(128)]
        chains.append(chain)
        n += len(chain)
    scale = 1_000_000 / n
    out: dict[str, float] = {}

    def traced(build: Any) -> float:
        gc.collect()
        tracemalloc.start()
        obj = build()
        used, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del obj
        return used * scale

    def prefix_index() -> PrefixIndex:
        idx = PrefixIndex(default_capacity_blocks=n)
        for k, chain in enumerate(chains):
            idx.insert(f"r{k % num_replicas}", [h ^ 1 for h in chain])  # fresh int objects
        idx.flush()
        return idx

    def ordered_dict() -> list[OrderedDict[int, None]]:
        tables: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        for k, chain in enumerate(chains):
            table = tables[k % num_replicas]
            for h in chain:
                table[h ^ 1] = None
        return tables

    def char_tree() -> Any:
        policy = make_policy("char-tree", block_size=BLOCK_SIZE)
        for k, chain in enumerate(chains):
            policy.tree.insert(tuple(h ^ 1 for h in chain), f"r{k % num_replicas}")  # type: ignore[attr-defined]
        return policy

    out["PrefixIndex (ours; cache-aware, sglang, llmd)"] = traced(prefix_index)
    out["OrderedDict exact LRU (reference)"] = traced(ordered_dict)
    out["char-tree radix tree (block symbols)"] = traced(char_tree)
    return out


def hashing_cost() -> list[tuple[int, float]]:
    rng = random.Random(1)
    out = []
    for n_tokens in (2048, 32768, 131072):
        tokens = [rng.randrange(32768) for _ in range(n_tokens)]
        reps = max(3, 200_000 // n_tokens)
        t = time.perf_counter()
        for _ in range(reps):
            chain_block_hashes(tokens, BLOCK_SIZE)
        out.append((n_tokens, (time.perf_counter() - t) / reps * 1e3))
    return out


def write_png(rows: list[dict[str, Any]], path: str, total_blocks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["replicas"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        sel = {r["policy"]: r for r in rows if r["replicas"] == size}
        xs = range(len(policies))
        ax.bar([x - 0.2 for x in xs], [sel[p]["p50_us"] for p in policies], width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [sel[p]["p99_us"] for p in policies], width=0.4, label="p99")
        ax.set_xticks(list(xs), policies, rotation=30)
        ax.set_ylabel("decision latency (us)")
        ax.set_title(f"{size} replicas, {total_blocks:,} indexed blocks")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    rows = []
    for size in args.replicas:
        for name in args.policies:
            print(f"  timing {name:<12} with {size} replicas ...", flush=True)
            rows.append(time_policy(name, size, args))
    print()
    print(
        f"Routing decision latency (choose() only; {args.decisions} decisions; block size {BLOCK_SIZE}; "
        f"{getattr(args, 'clock', 'wall')} clock)"
    )
    print("  update: the index maintenance a decision queues (PrefixIndex.flush), run after it returns")
    print(
        f"{'policy':<12} {'replicas':>8} {'indexed blocks':>15} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}"
        f" {'update p50':>11} {'update p99':>11} {'both p99':>9}"
    )
    for r in rows:
        print(
            f"{r['policy']:<12} {r['replicas']:>8} {r['indexed_blocks']:>15,} "
            f"{r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['mean_us']:>9.1f}"
            f" {r['update_p50_us']:>11.1f} {r['update_p99_us']:>11.1f} {r['with_update_p99_us']:>9.1f}"
        )
    print()
    print("Prompt hashing (once per request, before choose()):")
    for n_tokens, ms in hashing_cost():
        print(f"  {n_tokens:>7,} tokens: {ms:7.2f} ms")
    print()
    print(f"Index memory per million blocks ({args.replicas[-1]} replicas):")
    for label, nbytes in measure_memory(args.blocks, args.replicas[-1], args.seed).items():
        print(f"  {label:<48} {nbytes / 1e6:7.1f} MB  ({nbytes / 1e6:.0f} bytes/block)")
    if args.png:
        write_png(rows, args.png, args.blocks)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
