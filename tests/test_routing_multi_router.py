"""Several routers at once (one per gateway replica): how far their views diverge.

Each gateway's router sees only the requests it serves. The replica stats are common to
all, and the session store (Redis in production, a dict here) is shared, so a
conversation returns to the replica of its last turn whichever gateway serves it. We
replay one multi-turn workload through one router, through two routers splitting the
traffic at random, and through two routers without session affinity, and compare the
prefix-cache hit rate the engines would see (an engine model: one PrefixIndex per
replica fed with *all* traffic, prompts at prefill and replies at completion).
"""

from __future__ import annotations

import random
from collections import deque

from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.policy import ReplicaView, RouteRequest
from cluster.routing.prefix_index import PrefixIndex
from cluster.routing.registry import make_policy

B = 16
REPLICAS = [f"r{i}" for i in range(4)]
CAPACITY = 3000  # blocks per replica: enough pressure that placement matters


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


def replay(num_routers: int, shared_sessions: bool, policy: str = "cache-aware", seed: int = 0) -> float:
    rng = random.Random(seed)
    routers = [
        make_policy(policy, block_size=B, seed=seed + k, use_affinity=shared_sessions)
        if policy == "cache-aware"
        else make_policy(policy, block_size=B, seed=seed + k)
        for k in range(num_routers)
    ]
    engine = PrefixIndex(default_capacity_blocks=CAPACITY)
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
        )
        rid = router.choose(request, views).replica_id
        hit_tokens += engine.match(rid, hashes) * B
        prompt_tokens += len(prompt)
        held = chain_block_hashes(prompt + reply, B)
        engine.insert(rid, held)
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
