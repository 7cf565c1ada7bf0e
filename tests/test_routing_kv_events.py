"""KV cache events -> the router's prefix index, with vLLM's own event types and its own
ZMQ publisher (vllm/distributed/kv_events.py): stored chains are found under the
router's hashes, removals and clears take blocks out, a router that starts late (or
restarts) catches up through the replay socket, and a replaced replica's state is
dropped."""

from __future__ import annotations

import asyncio
import socket
import time

import msgspec
import pytest

from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.kv_events import KvEventSubscriber, ReplicaEventIndex, kv_events_engine_config
from cluster.routing.prefix_index import PrefixIndex

kv = pytest.importorskip("vllm.distributed.kv_events", reason="vLLM's event types")

BS = 16


def stored(engine_hashes: list[int], parent: int | None, tokens: list[int], medium: str = "GPU") -> object:
    return kv.BlockStored(
        block_hashes=engine_hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


def batch(*events: object) -> bytes:
    return msgspec.msgpack.encode(kv.KVEventBatch(ts=time.time(), events=list(events)))


PROMPT = list(range(1000, 1000 + 4 * BS))
REPLY = list(range(5000, 5000 + 2 * BS))


def test_stored_removed_cleared_map_onto_router_hashes() -> None:
    index = PrefixIndex()
    rep = ReplicaEventIndex("r0", index, BS)
    ours = chain_block_hashes(PROMPT + REPLY, BS)
    # The prompt's blocks, then the reply's two blocks continuing from the prompt's last.
    assert rep.apply(0, batch(stored([11, 12, 13, 14], None, PROMPT)))
    assert rep.apply(1, batch(stored([15, 16], 14, REPLY)))
    assert index.match("r0", ours) == 6
    assert index.match("r1", ours) == 0
    # The engine evicts the reply's last block: the match ends before it.
    rep.apply(2, batch(kv.BlockRemoved(block_hashes=[16], medium="GPU")))
    assert index.match("r0", ours) == 5
    # A replayed batch already applied changes nothing.
    assert not rep.apply(1, batch(stored([15, 16], 14, REPLY)))
    assert index.match("r0", ours) == 5
    # Blocks offloaded to CPU are not in the engine's KV cache.
    rep.apply(3, batch(stored([21], None, list(range(9000, 9000 + BS)), medium="CPU")))
    assert index.match("r0", chain_block_hashes(list(range(9000, 9000 + BS)), BS)) == 0
    # A parent never seen (lost events): not indexed, counted.
    rep.apply(4, batch(stored([31], 999, list(range(7000, 7000 + BS)))))
    assert rep.unmapped == 1
    assert rep.gap(7) == 5 and rep.gap(5) is None
    rep.apply(5, batch(kv.AllBlocksCleared()))
    assert index.match("r0", ours) == 0 and not rep.engine_to_router


def test_block_size_mismatch_is_an_error() -> None:
    rep = ReplicaEventIndex("r0", PrefixIndex(), 32)
    with pytest.raises(ValueError, match="block size"):
        rep.apply(0, batch(stored([1], None, PROMPT[:BS])))


def test_engine_config_renders_vllm_kv_events_config() -> None:
    assert kv_events_engine_config(False, 5557, 5558, "kv") is None
    cfg = kv_events_engine_config(True, 5557, 5558, "kv")
    assert cfg is not None
    from vllm.config.kv_events import KVEventsConfig

    parsed = KVEventsConfig(**cfg)  # vLLM accepts it as it is
    assert parsed.publisher == "zmq" and parsed.endpoint == "tcp://*:5557"
    assert parsed.replay_endpoint == "tcp://*:5558"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def test_live_events_and_replay_after_a_router_restart() -> None:
    port, replay_port = _free_port(), _free_port()
    pub = kv.ZmqEventPublisher(
        0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay_port}", topic="kv"
    )
    eps = {"r0": (f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}")}
    ours = chain_block_hashes(PROMPT + REPLY, BS)
    try:
        # (A PUB endpoint with "*" binds, as in the engine config.) Published before any
        # router listens: only the replay can deliver it.
        pub.publish(kv.KVEventBatch(ts=time.time(), events=[stored([11, 12, 13, 14], None, PROMPT)]))
        await asyncio.sleep(0.3)
        index = PrefixIndex()
        sub = KvEventSubscriber(index, BS, topic="kv")
        sub.set_replicas(eps)
        await _until(lambda: index.match("r0", ours) == 4)
        await asyncio.sleep(0.3)  # the SUB socket's subscription reaches the publisher
        pub.publish(kv.KVEventBatch(ts=time.time(), events=[stored([15, 16], 14, REPLY)]))
        await _until(lambda: index.match("r0", ours) == 6)
        await sub.close()

        # A restarted router starts empty and rebuilds the same state from the replay.
        index2 = PrefixIndex()
        sub2 = KvEventSubscriber(index2, BS, topic="kv")
        sub2.set_replicas(eps)
        await _until(lambda: index2.match("r0", ours) == 6)
        # The replica is replaced (new endpoints): its state is dropped.
        sub2.set_replicas({})
        assert index2.match("r0", ours) == 0
        await sub2.close()
    finally:
        pub.shutdown()


def test_cluster_config_renders_the_engine_argument_from_one_section() -> None:
    from cluster.config import KvEventsConfig
    from cluster.profiles import load_profile

    cfg = load_profile("cpu-tiny")
    assert cfg.router.kv_events.engine_config() is None  # off by default: approximate index
    on = cfg.model_copy(update={"router": cfg.router.model_copy(update={"kv_events": KvEventsConfig(enabled=True)})})
    from deployments.app import engine_kwargs

    kw = engine_kwargs(on, on.pools[0])
    assert kw["kv_events_config"]["endpoint"] == f"tcp://*:{on.router.kv_events.port}"
    assert kw["kv_events_config"]["topic"] == on.router.kv_events.topic
    assert "kv_events_config" not in engine_kwargs(cfg, cfg.pools[0])


def test_a_salted_chain_maps_onto_the_gateways_salted_root() -> None:
    # vLLM lists the request's cache_salt in the first block's extra keys; the gateway
    # starts that tenant's chains at salt_root(salt), so the two must meet.
    from cluster.routing.block_hash import salt_root

    index = PrefixIndex()
    rep = ReplicaEventIndex("r0", index, BS)
    ev = kv.BlockStored(
        block_hashes=[41, 42],
        parent_block_hash=None,
        token_ids=PROMPT[: 2 * BS],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[("tenant-a",), None],
    )
    rep.apply(0, batch(ev))
    assert index.match("r0", chain_block_hashes(PROMPT[: 2 * BS], BS, salt_root("tenant-a"))) == 2
    assert index.match("r0", chain_block_hashes(PROMPT[: 2 * BS], BS)) == 0  # unsalted: another chain


def test_a_replica_that_follows_its_engine_ignores_the_routers_guesses() -> None:
    index = PrefixIndex()
    ours = chain_block_hashes(PROMPT, BS)
    index.insert("r0", ours)  # the approximation's guess
    index.follow_engine("r0")
    assert index.match("r0", ours) == 0  # guesses dropped
    index.insert("r0", ours)
    assert index.match("r0", ours) == 0  # and ignored from now on
    index.store("r0", ours[:2])  # the engine's BlockStored
    assert index.match("r0", ours) == 2
    index.follow_engine("r0", False)  # events stopped: back to the approximation, afresh
    assert index.match("r0", ours) == 0
    index.insert("r0", ours)
    assert index.match("r0", ours) == 4
    index.follow_engine("r1")
    index.retain(["r0"])  # r1 left the pool
    assert not index.follows_engine("r1")


def test_endpoints_come_from_the_replicas_routing_stats() -> None:
    from cluster.routing.kv_events import endpoints_from_stats

    stats = {
        "a": {"kv_events_endpoint": "tcp://10.0.0.1:5557", "kv_events_replay_endpoint": "tcp://10.0.0.1:6557"},
        "b": {"kv_events_endpoint": "tcp://10.0.0.1:5558"},
        "c": {"num_waiting": 0},  # not reported (yet)
        "d": None,
    }
    assert endpoints_from_stats(stats) == {
        "a": ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:6557"),
        "b": ("tcp://10.0.0.1:5558", None),
    }


async def test_a_replica_whose_events_fail_falls_back_to_the_approximation() -> None:
    index = PrefixIndex()
    sub = KvEventSubscriber(index, BS, topic="kv")
    sub.set_replicas({"r0": ("not-an-endpoint", None)})  # zmq refuses it: the task ends
    await _until(lambda: not index.follows_engine("r0"))
    ours = chain_block_hashes(PROMPT, BS)
    index.insert("r0", ours)
    assert index.match("r0", ours) == 4
    await sub.close()


def test_pools_get_disjoint_event_ports() -> None:
    from cluster.config import ClusterConfig
    from cluster.profiles import load_profile
    from deployments.app import engine_kwargs

    data = load_profile("cpu-tiny").to_dict()
    data["router"]["kv_events"]["enabled"] = True
    cfg = ClusterConfig.model_validate(data)
    ports = [engine_kwargs(cfg, p)["kv_events_config"]["endpoint"] for p in cfg.pools]
    assert ports == ["tcp://*:5557", "tcp://*:5657"]
    replays = [engine_kwargs(cfg, p)["kv_events_config"]["replay_endpoint"] for p in cfg.pools]
    assert replays == ["tcp://*:6557", "tcp://*:6657"]
    data["router"]["kv_events"]["replay_port"] = 5600  # inside the PUB ports of the pools
    with pytest.raises(ValueError, match="clash"):
        ClusterConfig.model_validate(data)
    data["router"]["kv_events"]["replay_port"] = 6557
    data["router"]["index_block_size"] = 64  # events name engine blocks (32 on CPU)
    with pytest.raises(ValueError, match="block size"):
        ClusterConfig.model_validate(data)
