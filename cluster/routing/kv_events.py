"""An exact prefix index from vLLM's KV cache events (Ray-free).

vLLM 0.29 publishes, with `kv_events_config` (publisher "zmq"), every change of an
engine's prefix cache on a ZMQ PUB socket as multipart messages
`(topic, seq: 8-byte big-endian, payload)`, the payload a msgpack `KVEventBatch`
`[ts, events, data_parallel_rank]` whose events are tagged maps:

* `BlockStored`: `block_hashes` (engine hashes, bytes or int), `parent_block_hash` (the
  engine hash of the block before the first, None at the start of a prompt),
  `token_ids` (`block_size` tokens per block), `block_size`, `medium`, ...;
* `BlockRemoved`: `block_hashes`, `medium`;
* `AllBlocksCleared`.

(vllm/distributed/kv_events.py.) A ROUTER socket (`replay_endpoint`) resends the
buffered batches from a sequence number on request: `(b"", start_seq)` from a DEALER,
answered by `(b"", topic, seq, payload)` frames and an end marker with seq -1.

The router keeps its own hashing (cluster.routing.block_hash: vLLM's own hashes depend
on the engine's hash function and seed) and maps the engine's hashes onto it: a stored
block's router hash is `chain_block_hashes(tokens, block_size, parent)` where `parent`
is the router hash of the engine's parent block, or for a prompt's first block the
root the gateway uses for the request's cache salt (`salt_root`; vLLM lists the salt in
the first block's `extra_keys`). So every indexed block is one the engine holds, under
the hash the gateway computes for a prompt, and a removal names exactly the block it
evicted. Blocks on another medium (CPU offload) are ignored: the
index answers "cached in this engine's GPU/KV cache".

`ReplicaEventIndex` applies one replica's batches to a `PrefixIndex`, notices a gap in
the sequence numbers (the PUB socket drops under back-pressure, or the router
restarted) and asks for a replay from the first missing number; `KvEventSubscriber`
does the ZMQ I/O for a set of replicas.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cluster.routing.block_hash import chain_block_hashes, salt_root
from cluster.routing.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

END_SEQ = -1  # vLLM's replay end marker, as a signed 8-byte int
_decoder = msgspec.msgpack.Decoder()


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]]]:
    """(timestamp, events) of one published KVEventBatch payload."""
    raw = _decoder.decode(payload)
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError("not a KVEventBatch payload")
    return float(raw[0]), [e for e in raw[1] if isinstance(e, dict)]


def _first_block_salt(ev: Mapping[str, Any]) -> str | None:
    """The cache salt of a chain that starts a prompt: vLLM puts it last among the first
    block's extra keys (after LoRA and multimodal keys, which this deployment has none of)."""
    extra = ev.get("extra_keys")
    if not extra or not isinstance(extra, list) or not extra[0]:
        return None
    strings = [k for k in extra[0] if isinstance(k, str)]
    return strings[-1] if strings else None


def _key(h: Any) -> bytes | int:
    # Engine hashes are bytes (default) or ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES).
    return bytes(h) if isinstance(h, (bytes, bytearray, memoryview)) else int(h)


@dataclass
class ReplicaEventIndex:
    """One engine replica's events applied to the shared PrefixIndex."""

    replica_id: str
    index: PrefixIndex
    block_size: int  # the router's index block size; must equal the engine's
    medium: str | None = "GPU"
    next_seq: int | None = None  # the sequence number expected next (None: none seen)
    # engine hash -> router hash of every block the engine holds.
    engine_to_router: dict[bytes | int, int] = field(default_factory=dict)
    stored: int = 0
    removed: int = 0
    unmapped: int = 0  # stored blocks whose parent was never seen (lost events)

    def gap(self, seq: int) -> int | None:
        """The first missing sequence number if `seq` skips ahead, else None."""
        if self.next_seq is not None and seq > self.next_seq:
            return self.next_seq
        return None

    def apply(self, seq: int, payload: bytes) -> bool:
        """Apply one batch; False for a batch already applied (a replay overlap)."""
        if self.next_seq is not None and seq < self.next_seq:
            return False
        _, events = decode_batch(payload)
        for ev in events:
            self.apply_event(ev)
        self.next_seq = seq + 1
        return True

    def apply_event(self, ev: Mapping[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "AllBlocksCleared":
            self.clear()
            return
        medium = ev.get("medium")
        if self.medium is not None and medium is not None and medium != self.medium:
            return
        if kind == "BlockStored":
            self._stored(ev)
        elif kind == "BlockRemoved":
            gone = [self.engine_to_router.pop(_key(h), None) for h in ev.get("block_hashes", ())]
            hashes = [h for h in gone if h is not None]
            self.index.remove(self.replica_id, hashes)
            self.removed += len(hashes)

    def _stored(self, ev: Mapping[str, Any]) -> None:
        engine_hashes = [_key(h) for h in ev.get("block_hashes", ())]
        bs = int(ev.get("block_size") or self.block_size)
        if bs != self.block_size:
            raise ValueError(f"engine block size {bs} != index block size {self.block_size} ({self.replica_id})")
        parent_engine = ev.get("parent_block_hash")
        if parent_engine is None:
            parent = salt_root(_first_block_salt(ev))
        else:
            known = self.engine_to_router.get(_key(parent_engine))
            if known is None:
                self.unmapped += len(engine_hashes)
                return
            parent = known
        tokens = list(ev.get("token_ids", ()))
        ours = chain_block_hashes(tokens[: len(engine_hashes) * bs], bs, parent)
        for eh, h in zip(engine_hashes, ours, strict=False):
            self.engine_to_router[eh] = h
        # One store per chain keeps the index's recency order (parents first).
        self.index.store(self.replica_id, ours)
        self.stored += len(ours)

    def clear(self) -> None:
        self.index.drop(self.replica_id)
        self.engine_to_router.clear()


class KvEventSubscriber:
    """ZMQ side: a SUB socket per replica (its `endpoint`), and a DEALER to its replay
    endpoint when a batch is missing. `set_replicas` follows the pool: a replaced
    replica's state is dropped, a new one starts from a replay of the engine's buffer
    (so a restarted router rebuilds its index from what the engines still buffer).

    While a replica's events flow, its index entry follows the engine alone
    (`PrefixIndex.follow_engine`); when they stop (the socket fails) the replica falls
    back to the router's approximation."""

    def __init__(self, index: PrefixIndex, block_size: int, topic: str = "") -> None:
        import zmq.asyncio

        self.index = index
        self.block_size = block_size
        self.topic = topic.encode()
        self._ctx = zmq.asyncio.Context.instance()
        self.replicas: dict[str, ReplicaEventIndex] = {}
        self._endpoints: dict[str, tuple[str, str | None]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def set_replicas(self, endpoints: Mapping[str, tuple[str, str | None]]) -> None:
        """replica id -> (PUB endpoint, replay endpoint or None), e.g. tcp://10.0.0.5:5557."""
        for rid in [r for r in self._endpoints if r not in endpoints or self._endpoints[r] != endpoints[r]]:
            self._stop(rid)
        for rid, eps in endpoints.items():
            if rid not in self._tasks:
                self._endpoints[rid] = eps
                self.replicas[rid] = ReplicaEventIndex(rid, self.index, self.block_size)
                self.index.follow_engine(rid)
                self._tasks[rid] = asyncio.get_running_loop().create_task(self._run(rid, *eps))

    def _stop(self, rid: str) -> None:
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()
        self._endpoints.pop(rid, None)
        rep = self.replicas.pop(rid, None)
        if rep is not None:
            rep.clear()
            self.index.follow_engine(rid, False)

    def following(self) -> list[str]:
        """Replicas whose index entry follows their engine's events now."""
        return [rid for rid in self.replicas if self.index.follows_engine(rid)]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for rid in list(self._tasks):
            self._stop(rid)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, rid: str, endpoint: str, replay: str | None) -> None:
        import zmq

        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        rep = self.replicas[rid]
        try:
            sub.connect(endpoint)
            if replay is not None:
                await self._replay_or_log(rep, replay, 0)  # what the engine did before we listened
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                missing = rep.gap(seq)
                if missing is not None and replay is not None:
                    await self._replay_or_log(rep, replay, missing)
                rep.apply(seq, payload)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the approximate index keeps working without events
            log.exception("kv events of %s stopped; its index falls back to the approximation", rid)
            if self.replicas.get(rid) is rep:
                rep.clear()
                self.index.follow_engine(rid, False)
        finally:
            sub.close(linger=0)

    async def _replay_or_log(self, rep: ReplicaEventIndex, endpoint: str, start_seq: int) -> None:
        # A replay that does not answer costs the history, not the live events.
        try:
            await self.replay(rep, endpoint, start_seq)
        except TimeoutError:
            log.warning("kv events replay from %s (seq %d) did not answer", endpoint, start_seq)

    async def replay(self, rep: ReplicaEventIndex, endpoint: str, start_seq: int, timeout_s: float = 5.0) -> int:
        """Ask the engine's replay socket for every buffered batch from `start_seq`;
        returns how many were applied."""
        import zmq

        sock = self._ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        applied = 0
        try:
            await sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), timeout_s)
                _, _topic, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == END_SEQ:
                    return applied
                applied += rep.apply(seq, payload)
        finally:
            sock.close(linger=0)


def kv_events_engine_config(enabled: bool, port: int, replay_port: int | None, topic: str) -> dict[str, Any] | None:
    """vLLM's `kv_events_config` engine argument (None when events are off)."""
    if not enabled:
        return None
    cfg: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "topic": topic,
    }
    if replay_port is not None:
        cfg["replay_endpoint"] = f"tcp://*:{replay_port}"
    return cfg


def endpoints_from_stats(stats: Mapping[str, Mapping[str, Any] | None]) -> dict[str, tuple[str, str | None]]:
    """replica id -> (PUB, replay) endpoints from the routing stats the engine replicas
    report (deployments.engine: `kv_events_endpoint`, `kv_events_replay_endpoint`);
    replicas that report none (yet) are left out."""
    out: dict[str, tuple[str, str | None]] = {}
    for rid, s in stats.items():
        endpoint = (s or {}).get("kv_events_endpoint")
        if isinstance(endpoint, str) and endpoint:
            replay = (s or {}).get("kv_events_replay_endpoint")
            out[rid] = (endpoint, replay if isinstance(replay, str) and replay else None)
    return out


def replica_endpoints(
    hosts: Mapping[str, str], port: int, replay_port: int | None
) -> dict[str, tuple[str, str | None]]:
    """replica id -> (PUB, replay) endpoints of engines at the given hosts."""
    return {
        rid: (f"tcp://{host}:{port}", f"tcp://{host}:{replay_port}" if replay_port is not None else None)
        for rid, host in hosts.items()
    }


__all__ = [
    "KvEventSubscriber",
    "endpoints_from_stats",
    "ReplicaEventIndex",
    "decode_batch",
    "kv_events_engine_config",
    "replica_endpoints",
]
