"""The Ray glue's pure parts, with the real Ray Serve and vLLM types (no cluster)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray.cloudpickle as cloudpickle
from ray.serve.config import RequestRouterConfig
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from cluster.routing import hints
from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.hints import RoutingHint
from deployments.request_router import replica_view, request_from_body, request_from_hint

ROUTER = "deployments.request_router:PolicyRequestRouter"


def test_ray_ships_the_router_class_and_it_uses_this_process_hint_board() -> None:
    # Ray pickles the router's module by value; state it reaches must not be copied.
    config = RequestRouterConfig(
        request_router_class=ROUTER, request_router_kwargs={"policy": "cache-aware", "block_size": 16, "options": {}}
    )
    cls = cloudpickle.loads(config.get_serialized_request_router_cls())
    assert cls.__name__ == "PolicyRequestRouter"
    assert cls.__init__.__globals__["routing_hints"] is hints


def test_replica_view_from_routing_stats() -> None:
    stats = {
        "num_waiting": 3,
        "num_running": 7,
        "kv_usage": 0.4,
        "kv_capacity_blocks": 900,
        "max_num_seqs": 64,
        "block_size": 16,
        "kv_events_endpoint": "tcp://x",
    }
    v = replica_view("abc", stats, in_flight=2)
    assert (v.replica_id, v.num_waiting, v.num_running, v.kv_usage) == ("abc", 3, 7, 0.4)
    assert (v.kv_capacity_blocks, v.max_num_seqs, v.in_flight, v.load) == (900, 64, 2, 12)
    empty = replica_view("abc", None)
    assert empty.load == 0 and empty.kv_capacity_blocks == 0 and empty.max_num_seqs == 256


def test_request_from_hint_hashes_the_gateway_tokens() -> None:
    ids = list(range(100))
    hint = RoutingHint(prompt_token_ids=ids, pool="standard", max_tokens=20, session_id="s1", affinity_replica="r2")
    req = request_from_hint("rid", hint, 16)
    assert req.block_hashes == chain_block_hashes(ids, 16) and len(req.block_hashes) == 6
    assert (req.prompt_tokens, req.max_tokens, req.session_id, req.affinity_replica) == (100, 20, "s1", "r2")


def test_request_from_body_without_hint() -> None:
    history = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi there " * 10}]
    a = ChatCompletionRequest.model_validate({"model": "m", "messages": history, "max_tokens": 5})
    follow_up = [*history, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    b = ChatCompletionRequest.model_validate({"model": "m", "messages": follow_up, "session_id": "sess"})
    ra, rb = request_from_body(a.request_id, a, 16), request_from_body(b.request_id, b, 16)
    assert ra.max_tokens == 5 and rb.session_id == "sess"
    assert len(ra.block_hashes) > 3
    assert rb.block_hashes[: len(ra.block_hashes) - 1] == ra.block_hashes[:-1]  # the history is a shared prefix
    c = CompletionRequest.model_validate({"model": "m", "prompt": list(range(40))})
    rc = request_from_body(c.request_id, c, 16)
    assert rc.block_hashes == chain_block_hashes(list(range(40)), 16)


def test_request_from_hint_uses_gateway_hashes_of_the_same_block_size() -> None:
    ids = list(range(64))
    pre = chain_block_hashes(ids, 16)
    same = RoutingHint(prompt_token_ids=ids, pool="standard", block_hashes=pre, hash_block_size=16)
    assert request_from_hint("r", same, 16).block_hashes is pre
    # Hashed at another block size: the router rehashes at the engine's.
    other = RoutingHint(
        prompt_token_ids=ids, pool="standard", block_hashes=chain_block_hashes(ids, 32), hash_block_size=32
    )
    assert list(request_from_hint("r", other, 16).block_hashes) == pre


# -- PolicyRequestRouter.choose_replicas with fake running replicas (as Ray tests its routers) --


class FakeReplica:
    """The part of Serve's RunningReplica the router reads."""

    def __init__(self, unique_id: str, stats: dict[str, Any] | None = None) -> None:
        from ray.serve._private.common import DeploymentID, ReplicaID

        self.replica_id = ReplicaID(unique_id=unique_id, deployment_id=DeploymentID(name="engine-standard"))
        self.routing_stats = stats or {"num_waiting": 0, "num_running": 0, "kv_usage": 0.0, "max_num_seqs": 16}
        self.max_ongoing_requests = 64

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def make_router(policy: str = "cache-aware", pool: str = "standard") -> Any:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from deployments.request_router import PolicyRequestRouter

    router = PolicyRequestRouter(
        deployment_id=DeploymentID(name=f"engine-{pool}"), handle_source=DeploymentHandleSource.UNKNOWN
    )
    router.initialize_state(policy=policy, block_size=16, pool=pool)
    return router


def pending(body: Any, session_id: str = "") -> Any:
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    meta = RequestMetadata(request_id="r", internal_request_id="ir", session_id=session_id)
    return PendingRequest(args=[body], kwargs={}, metadata=meta)


async def test_choose_replicas_follows_the_gateway_hint_and_learns_what_finished() -> None:
    from cluster.routing import hints

    router = make_router()
    replicas = [FakeReplica("a"), FakeReplica("b")]
    router.update_replicas(replicas)
    ids = list(range(256))
    body = CompletionRequest.model_validate({"model": "m", "prompt": ids, "request_id": "req-1"})
    hint = RoutingHint(
        prompt_token_ids=ids, pool="standard", block_hashes=chain_block_hashes(ids, 16), hash_block_size=16
    )
    hints.HINTS.post("req-1", hint)
    [[first]] = await router.choose_replicas(replicas, pending(body))
    assert hint.chosen_replica == first.replica_id.unique_id
    assert hint.routed_request_id == "req-1"
    held = router._policy.index.pinned_blocks(first.replica_id.unique_id)
    assert held == 16  # in flight: its blocks are pinned in the policy's index
    # The gateway reports what the replica now holds; the next request with that prefix follows it.
    assert hints.HINTS.listeners("standard") >= 1
    hints.HINTS.finish("req-1", chain_block_hashes(ids, 16), len(ids))
    await asyncio.sleep(0)  # applied on the router's loop
    # The finish reached the policy under the id it routed: what it held is released.
    assert router._policy.index.pinned_blocks(first.replica_id.unique_id) == 0
    for n in range(5):
        body2 = CompletionRequest.model_validate({"model": "m", "prompt": ids + [7] * 32, "request_id": f"q{n}"})
        hint2 = RoutingHint(
            prompt_token_ids=ids + [7] * 32,
            pool="standard",
            block_hashes=chain_block_hashes(ids + [7] * 32, 16),
            hash_block_size=16,
        )
        hints.HINTS.post(f"q{n}", hint2)
        [[again]] = await router.choose_replicas(replicas, pending(body2))
        assert again is first and hint2.matched_blocks >= 16  # the finished prefix (and what it routed since)
        hints.HINTS.pop(f"q{n}")


async def test_choose_replicas_without_a_hint_keeps_session_affinity_and_skips_dead_replicas() -> None:
    router = make_router()
    # Affinity is priced like any cached prefix: the engines must report a KV cache that
    # holds the session's prompt, and the replica must be done prefilling the last copy
    # (750 tokens, under 0.1 s at the policy's default rate) before the next comes.
    stats = {"num_waiting": 0, "num_running": 0, "kv_usage": 0.0, "max_num_seqs": 16, "kv_capacity_blocks": 10_000}
    replicas = [FakeReplica(r, dict(stats)) for r in "abc"]
    router.update_replicas(replicas)
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi " * 1000}]})
    [[chosen]] = await router.choose_replicas(replicas, pending(body, session_id="s1"))
    for _ in range(3):
        await asyncio.sleep(0.2)
        [[same]] = await router.choose_replicas(replicas, pending(body, session_id="s1"))
        assert same is chosen
    assert await router.choose_replicas([], pending(body)) == []


async def test_a_finished_request_of_another_pool_is_not_heard() -> None:
    from cluster.routing import hints

    router = make_router(pool="long")
    router.update_replicas([FakeReplica("a")])
    router._loop = asyncio.get_running_loop()
    seen: list[Any] = []
    router._policy.on_finished = lambda *a: seen.append(a)  # type: ignore[method-assign]
    hint = RoutingHint(prompt_token_ids=[1], pool="standard", chosen_replica="a", hash_block_size=16)
    hints.HINTS.post("other-pool", hint)
    hints.HINTS.finish("other-pool", [1, 2], 32)
    await asyncio.sleep(0)
    assert seen == []
    hint_long = RoutingHint(prompt_token_ids=[1], pool="long", chosen_replica="a", hash_block_size=16)
    hints.HINTS.post("same-pool", hint_long)
    hints.HINTS.finish("same-pool", [1, 2], 32)
    await asyncio.sleep(0)
    assert len(seen) == 1


def test_a_router_that_is_gone_unsubscribes() -> None:
    import gc

    from cluster.routing import hints

    before = hints.HINTS.listeners("gone-pool")
    router = make_router(pool="gone-pool")
    assert hints.HINTS.listeners("gone-pool") == before + 1
    del router
    gc.collect()
    assert hints.HINTS.listeners("gone-pool") == before


async def test_the_hint_carries_the_policys_reason_and_the_decision_time_fallback_when_it_fails() -> None:
    import time

    from cluster.routing import hints

    router = make_router()
    replicas = [FakeReplica("a"), FakeReplica("b", {"num_waiting": 5, "num_running": 16, "max_num_seqs": 16})]
    router.update_replicas(replicas)
    body = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "request_id": "reason-1"})
    hint = RoutingHint(prompt_token_ids=[1, 2, 3], pool="standard")
    hints.HINTS.post("reason-1", hint)
    before = time.monotonic()
    [[chosen]] = await router.choose_replicas(replicas, pending(body))
    assert hint.reason == "min-ttft" and hint.routed_at is not None and hint.routed_at >= before
    assert chosen.replica_id.unique_id == "a"  # the idle one

    def broken(*args: Any) -> Any:
        raise RuntimeError("policy bug")

    router._policy.choose = broken  # type: ignore[method-assign]
    hint2 = RoutingHint(prompt_token_ids=[1, 2, 3], pool="standard", matched_blocks=3)
    hints.HINTS.post("reason-2", hint2)
    body2 = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "request_id": "reason-2"})
    [[fallback]] = await router.choose_replicas(replicas, pending(body2))
    assert (hint2.reason, hint2.chosen_replica, hint2.matched_blocks) == ("fallback", "a", 0)
    assert fallback.replica_id.unique_id == "a"  # the least loaded
    hints.HINTS.pop("reason-1")
    hints.HINTS.pop("reason-2")


async def test_with_kv_events_the_router_follows_each_replicas_engine() -> None:
    """Each replica reports its event endpoints in its routing stats; the router subscribes
    and its index holds what the engine published, not what the router guessed."""
    import socket
    import time

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

    from deployments.request_router import PolicyRequestRouter

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port, replay = free_port(), free_port()
    pub = ZmqEventPublisher(0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay}", topic="kv")
    router = PolicyRequestRouter(
        deployment_id=DeploymentID(name="engine-standard"), handle_source=DeploymentHandleSource.UNKNOWN
    )
    router.initialize_state(policy="cache-aware", block_size=16, pool="kv", kv_events={"enabled": True, "topic": "kv"})
    idle = {"num_waiting": 0, "num_running": 0, "kv_usage": 0.0, "max_num_seqs": 16}
    with_events = {
        **idle,
        "kv_events_endpoint": f"tcp://127.0.0.1:{port}",
        "kv_events_replay_endpoint": f"tcp://127.0.0.1:{replay}",
    }
    replicas = [FakeReplica("a", dict(idle)), FakeReplica("b", with_events)]
    ids = list(range(160))
    try:
        router.update_replicas(replicas)  # on the loop: subscribes to b at once
        index = router._policy.index
        assert index.follows_engine("b") and not index.follows_engine("a")
        pub.publish(
            KVEventBatch(
                ts=time.time(),
                events=[
                    BlockStored(
                        block_hashes=list(range(10)),
                        parent_block_hash=None,
                        token_ids=ids,
                        block_size=16,
                        lora_id=None,
                        medium="GPU",
                        lora_name=None,
                    )
                ],
            )
        )
        hashes = chain_block_hashes(ids, 16)
        deadline = time.monotonic() + 10
        while index.match("b", hashes) < 10:  # the replay delivers it even before SUB joins
            assert time.monotonic() < deadline, router.kv_event_stats()
            await asyncio.sleep(0.05)
        body = CompletionRequest.model_validate({"model": "m", "prompt": ids, "request_id": "kv-1"})
        hint = RoutingHint(prompt_token_ids=ids, pool="kv", block_hashes=hashes, hash_block_size=16)
        hints.HINTS.post("kv-1", hint)
        [[chosen]] = await router.choose_replicas(replicas, pending(body))
        assert chosen.replica_id.unique_id == "b" and hint.matched_blocks == 10
        hints.HINTS.pop("kv-1")
        # A new prompt routed to b is not guessed into b's index: only b's engine says what it holds.
        other = list(range(1000, 1160))
        index.insert("b", chain_block_hashes(other, 16))
        assert index.match("b", chain_block_hashes(other, 16)) == 0
        assert router.kv_event_stats()["b"]["stored"] == 10
        # b leaves the pool: its subscription and state go.
        router.update_replicas(replicas[:1])
        assert index.match("b", hashes) == 0 and not index.follows_engine("b")
    finally:
        if router._kv is not None:
            await router._kv.close()
        pub.shutdown()


async def test_a_replicas_view_is_rebuilt_only_when_its_stats_or_in_flight_change() -> None:
    router = make_router()
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    first = router._view(a)
    assert router._view(a) is first  # nothing changed: the same view
    a.routing_stats = dict(a.routing_stats)  # new stats of equal content: still the same
    assert router._view(a) is first
    router.on_send_request(a.replica_id)  # one more request not yet reported
    sent = router._view(a)
    assert sent is not first and sent.in_flight == 1
    a.routing_stats = {**a.routing_stats, "num_waiting": 2}  # the replica reports again
    reported = router._view(a)
    assert (reported.num_waiting, reported.in_flight) == (2, 0)
    assert router._view(b).replica_id == "b"
    router.update_replicas([b])  # a is gone: its cached view with it
    assert set(router._views) == {"b"}
