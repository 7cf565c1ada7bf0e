"""Several routers at once (one per gateway replica): how far their views diverge.

Each gateway's router sees only the requests it serves. The replica stats are common to
all, and the session store (Redis in production, a dict here) is shared, so a
conversation returns to the replica of its last turn whichever gateway serves it. We
replay one multi-turn workload through one router, through two routers splitting the
traffic at random, and through two routers without session affinity, and compare the
prefix-cache hit rate the engines would see. The engines are the simulator's model of
vLLM's paged block cache (bench.sim.kv_cache.PrefixKVCache, one per replica, LRU eviction of
unreferenced blocks), fed with *all* traffic: independent of the routers' own indexes.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from bench.sim.kv_cache import PrefixKVCache
from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.policy import ReplicaView, RouteRequest
from cluster.routing.registry import make_policy

B = 16
REPLICAS = [f"r{i}" for i in range(4)]
CAPACITY = 3000  # blocks per replica: enough pressure that placement matters
# Requests 0.1 s apart (half of the 4 replicas' prefill capacity at the policy's default
# rate): routers price queueing, so time must pass between requests, as it does live.
ARRIVAL_GAP_S = 0.1


def workload(seed: int) -> list[tuple[str, list[int], list[int]]]:
    """(session, prompt tokens, reply tokens) in arrival order: 80 conversations of 2-8
    turns over 4 shared system prompts, interleaved."""
    rng = random.Random(seed)
    systems = [[rng.randrange(32768) for _ in range(rng.randrange(400, 1200))] for _ in range(4)]
    convs = []
    for s in range(80):
        history = list(rng.choice(systems))
        turns = []
        for _ in range(rng.randrange(2, 9)):
            prompt = history + [rng.randrange(32768) for _ in range(rng.randrange(20, 200))]
            reply = [rng.randrange(32768) for _ in range(rng.randrange(30, 300))]
            turns.append((f"s{s}", prompt, reply))
            history = prompt + reply
        convs.append(deque(turns))
    out = []
    while convs:
        conv = rng.choice(convs)
        out.append(conv.popleft())
        if not conv:
            convs.remove(conv)
    return out


def serve(cache: PrefixKVCache, prompt: Sequence[int], held: Sequence[int]) -> int:
    """One request on a replica's engine: the prompt's cached prefix is reused, the rest of
    the conversation (prompt + reply) is computed and cached. Returns the hit blocks."""
    hit = cache.match(prompt)
    cache.acquire(prompt[:hit])
    new = held[hit:]
    if not cache.allocate(len(new)):
        cache.release(prompt[:hit], 0)
        return hit
    registered = [h for h in new if cache.register(h)]
    cache.release([*prompt[:hit], *registered], len(new) - len(registered))
    return hit


def replay(num_routers: int, shared_sessions: bool, policy: str = "cache-aware", seed: int = 0) -> float:
    rng = random.Random(seed)
    routers = [
        make_policy(policy, block_size=B, seed=seed + k, use_affinity=shared_sessions)
        if policy == "cache-aware"
        else make_policy(policy, block_size=B, seed=seed + k)
        for k in range(num_routers)
    ]
    engines = {r: PrefixKVCache(CAPACITY) for r in REPLICAS}
    sessions: dict[str, str] = {}
    recent: deque[str] = deque(maxlen=16)  # load proxy: requests in the last window
    hit_tokens = prompt_tokens = 0
    for i, (session, prompt, reply) in enumerate(workload(seed)):
        router = routers[rng.randrange(num_routers)]
        views = [ReplicaView(r, num_running=recent.count(r), kv_capacity_blocks=CAPACITY) for r in REPLICAS]
        hashes = chain_block_hashes(prompt, B)
        request = RouteRequest(
            f"q{i}",
            len(prompt),
            hashes,
            session_id=session,
            affinity_replica=sessions.get(session) if shared_sessions else None,
            arrival_s=i * ARRIVAL_GAP_S,
        )
        rid = router.choose(request, views).replica_id
        held = chain_block_hashes(prompt + reply, B)
        hit_tokens += serve(engines[rid], hashes, held) * B
        prompt_tokens += len(prompt)
        router.on_finished(request, rid, held)
        sessions[session] = rid
        recent.append(rid)
    return hit_tokens / prompt_tokens


def test_two_routers_lose_little_hit_rate_with_shared_sessions() -> None:
    one = replay(1, shared_sessions=True)
    two = replay(2, shared_sessions=True)
    two_no_affinity = replay(2, shared_sessions=False)
    four = replay(4, shared_sessions=True)
    pow2 = replay(1, shared_sessions=False, policy="pow2")
    print(
        f"\nprefix-cache hit rate: 1 router {one:.3f}; 2 routers {two:.3f}; 4 routers {four:.3f}; "
        f"2 routers without shared sessions {two_no_affinity:.3f}; pow2 {pow2:.3f}"
    )
    assert two >= one - 0.05
    assert four >= one - 0.08
    assert two > pow2 + 0.2
    # The shared session store is what keeps several routers close to one: without it each
    # router's partial view sends follow-up turns away from their cached history.
    assert two_no_affinity < two - 0.03
    assert two_no_affinity > pow2
