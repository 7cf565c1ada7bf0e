"""Session store on Redis with Sentinel: a failover mid-conversation loses no acknowledged turn.

Real processes: one master and two replicas (redis-server, tests/redis_server.py) and three
Sentinels (Debian's `redis-sentinel`, quorum 2, down-after 1 s). The store is built from the
typed config exactly as the gateway builds it (`sessions.sentinel_master`, the URL listing the
Sentinels), so commits WAIT for one replica (the default with Sentinel). Conversations go
through SessionFlow (the gateway's prepare -> commit) and retry a 503 as a client would.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from cluster.config import ClusterConfig, SessionConfig
from cluster.profiles import load_profile
from cluster.sessions.errors import SessionStoreUnavailable
from cluster.sessions.flow import PreparedTurn, SessionFlow
from tests.redis_server import RedisServer, free_port

MASTER_NAME = "mymaster"
# Debian's redis-sentinel package; redis-server --sentinel is the same program.
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
TENANT = "acme"


class SentinelServer:
    """One redis-sentinel process monitoring `master` (its config file must stay writable:
    Sentinel records the topology it learns there)."""

    def __init__(self, master_port: int, replica_ports: list[int], *, quorum: int, down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sentinel-test-"))
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode no",
                    f"dir {self.dir}",
                    f"logfile {self.dir / 'sentinel.log'}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
                    f"sentinel failover-timeout {MASTER_NAME} 10000",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                ]
                # What Sentinel would learn from the master's INFO within 10 s, told up front.
                + [f"sentinel known-replica {MASTER_NAME} 127.0.0.1 {p}" for p in replica_ports]
            )
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        self.proc = subprocess.Popen([REDIS_SENTINEL, str(self.conf)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-sentinel did not come up on {self.port}: {self.log()}")

    def master_port(self) -> int:
        addr: Any = redis.Redis(port=self.port).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(addr[1])

    def log(self) -> str:
        path = self.dir / "sentinel.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Topology:
    master: RedisServer
    replicas: list[RedisServer]
    sentinels: list[SentinelServer]
    by_port: dict[int, RedisServer] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def current_master(self) -> RedisServer:
        return self.by_port[self.sentinels[0].master_port()]

    def wait_for_new_master(self, old: RedisServer, timeout_s: float = 30) -> RedisServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ports = {s.master_port() for s in self.sentinels}
            if len(ports) == 1 and old.port not in ports:
                return self.by_port[ports.pop()]
            time.sleep(0.1)
        raise AssertionError("no failover within the timeout:\n" + self.sentinels[0].log())


def _replicate(replica: RedisServer, master: RedisServer) -> None:
    client = redis.Redis(port=replica.port, decode_responses=True)
    client.replicaof("127.0.0.1", master.port)
    deadline = time.monotonic() + 10
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {replica.port} never linked to {master.port}")
        time.sleep(0.05)


@pytest.fixture
def topology() -> Iterator[Topology]:
    master = RedisServer().start()
    # Full syncs start at once (the default waits 5 s for more replicas to join one transfer).
    redis.Redis(port=master.port).config_set("repl-diskless-sync-delay", 0)
    replicas = [RedisServer().start() for _ in range(2)]
    for r in replicas:
        _replicate(r, master)
    sentinels = [SentinelServer(master.port, [r.port for r in replicas], quorum=2).start() for _ in range(3)]
    topo = Topology(master, replicas, sentinels, {s.port: s for s in [master, *replicas]})
    # Wait until every Sentinel knows both replicas (learned from the master's INFO).
    deadline = time.monotonic() + 15
    while any(len(redis.Redis(port=s.port).sentinel_slaves(MASTER_NAME)) < 2 for s in sentinels):
        if time.monotonic() > deadline:
            raise RuntimeError("Sentinels did not discover the replicas:\n" + sentinels[0].log())
        time.sleep(0.1)
    try:
        yield topo
    finally:
        for s in sentinels:
            s.cleanup()
        for r in [master, *replicas]:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            r.cleanup()


def sentinel_config(topo: Topology, **overrides: object) -> ClusterConfig:
    cfg = load_profile("cpu-tiny")
    fields = cfg.sessions.model_dump()
    fields.update(redis_url=topo.url, redis_url_env=None, sentinel_master=MASTER_NAME, **overrides)
    cfg.sessions = SessionConfig(**fields)
    return cfg


async def _retrying(call: Callable[[], Awaitable[Any]], what: str, stats: dict[str, int], deadline: float) -> Any:
    """A client's retry of a 503 (Retry-After), bounded."""
    while True:
        try:
            return await call()
        except SessionStoreUnavailable:
            stats[what] = stats.get(what, 0) + 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _conversation(
    flow: SessionFlow, sid: str, turns: int, acked: list[str], stats: dict[str, int], deadline: float,
    before_commit: asyncio.Event | None = None, resume: asyncio.Event | None = None,
) -> None:  # fmt: skip
    for i in range(turns):
        text = f"{sid} turn {i}"

        async def prepare(text: str = text) -> PreparedTurn:
            return await flow.prepare(TENANT, sid, [{"role": "user", "content": text}])

        prepared: PreparedTurn = await _retrying(prepare, "prepare_503", stats, deadline)
        if before_commit is not None and resume is not None and i == turns // 2:
            before_commit.set()  # the master dies now, between generation and commit
            await resume.wait()

        async def commit(prepared: PreparedTurn = prepared, text: str = text) -> object:
            # The same prepared turn (same turn id): a retry is recognised, never stored twice.
            return await flow.commit(prepared, {"role": "assistant", "content": f"reply to {text}"})

        await _retrying(commit, "commit_503", stats, deadline)
        acked.append(text)  # the client got its reply: the turn is acknowledged


async def test_failover_mid_conversation_loses_no_acknowledged_turn(topology: Topology) -> None:
    cfg = sentinel_config(topology)
    assert cfg.sessions.replicas_to_ack == 1  # durable by default with Sentinel
    flow = SessionFlow.from_config(cfg)
    assert flow.store is not None
    sessions = [(await flow.store.create(TENANT)).session_id for _ in range(4)]
    acked: dict[str, list[str]] = {sid: [] for sid in sessions}
    stats: dict[str, int] = {}
    deadline = time.monotonic() + 60
    before_commit, resume = asyncio.Event(), asyncio.Event()
    old = topology.current_master()

    async def kill_master_mid_turn() -> None:
        await before_commit.wait()  # conversation 0 has prepared a turn and not committed it
        old.stop(kill=True)
        resume.set()
        await asyncio.to_thread(topology.wait_for_new_master, old)

    tasks = [
        _conversation(flow, sid, 12, acked[sid], stats, deadline, *((before_commit, resume) if k == 0 else ()))
        for k, sid in enumerate(sessions)
    ]
    t0 = time.monotonic()
    await asyncio.gather(kill_master_mid_turn(), *tasks)
    elapsed = time.monotonic() - t0
    new = topology.current_master()
    assert new is not old and new in topology.replicas
    assert stats.get("commit_503", 0) + stats.get("prepare_503", 0) > 0, "the failover never hit a request"

    # Every acknowledged turn is on the promoted master, once, in order; nothing else is.
    check = SessionFlow.from_config(cfg)
    assert check.store is not None
    for sid in sessions:
        snap = await check.store.read(TENANT, sid)
        stored = [t.messages[0]["content"] for t in snap.turns]
        assert stored == acked[sid] == [f"{sid} turn {i}" for i in range(12)]
        assert snap.version == 12
    # The remaining replica follows the new master and has the same data.
    other = next(r for r in topology.replicas if r is not new)
    deadline_sync = time.monotonic() + 15
    replica = Redis(port=other.port, decode_responses=True)
    while (await replica.info("replication")).get("master_port") != new.port or (await replica.info("replication")).get(
        "master_link_status"
    ) != "up":
        assert time.monotonic() < deadline_sync, "the other replica never followed the new master"
        await asyncio.sleep(0.1)
    print(f"\nfailover mid-conversation: 4 x 12 turns in {elapsed:.1f} s, 503s retried: {stats}")
    await replica.aclose()
    await flow.store.aclose()
    await check.store.aclose()


async def test_a_commit_no_replica_confirms_is_not_acknowledged(topology: Topology) -> None:
    """WAIT is enforced: with both replicas frozen the commit gets 503 after the timeout;
    retried after they resume, the same turn is stored exactly once."""
    cfg = sentinel_config(topology, commit_replica_timeout_ms=300)
    flow = SessionFlow.from_config(cfg)
    assert flow.store is not None
    sid = (await flow.store.create(TENANT)).session_id
    prepared = await flow.prepare(TENANT, sid, [{"role": "user", "content": "hello"}])
    for r in topology.replicas:
        assert r.proc is not None
        r.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(SessionStoreUnavailable, match="confirmed by 0 of 1 replica"):
            await flow.commit(prepared, {"role": "assistant", "content": "hi"})
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 2.0
    finally:
        for r in topology.replicas:
            assert r.proc is not None
            r.proc.send_signal(signal.SIGCONT)
    result = await flow.commit(prepared, {"role": "assistant", "content": "hi"})
    assert result.duplicate  # the first attempt reached the master; the retry only waited
    snap = await flow.store.read(TENANT, sid)
    assert [t.messages[0]["content"] for t in snap.turns] == ["hello"]
    await flow.store.aclose()


async def test_without_replica_acks_a_commit_returns_at_once(topology: Topology) -> None:
    """commit_replicas: 0 is asynchronous replication: frozen replicas do not delay commits
    (and a failover may then lose the last replication lag of turns)."""
    cfg = sentinel_config(topology, commit_replicas=0)
    flow = SessionFlow.from_config(cfg)
    assert flow.store is not None
    sid = (await flow.store.create(TENANT)).session_id
    prepared = await flow.prepare(TENANT, sid, [{"role": "user", "content": "hello"}])
    for r in topology.replicas:
        assert r.proc is not None
        r.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        result = await flow.commit(prepared, {"role": "assistant", "content": "hi"})
        assert time.monotonic() - t0 < 0.3 and not result.duplicate
    finally:
        for r in topology.replicas:
            assert r.proc is not None
            r.proc.send_signal(signal.SIGCONT)
    await flow.store.aclose()


def test_commit_timeout_must_fit_in_the_socket_timeout() -> None:
    with pytest.raises(ValueError, match="commit_replica_timeout_ms"):
        SessionConfig(sentinel_master=MASTER_NAME, socket_timeout_s=1.0, commit_replica_timeout_ms=1000)
    assert SessionConfig().replicas_to_ack == 0  # a single Redis has no replica to wait for
    assert SessionConfig(sentinel_master=MASTER_NAME).replicas_to_ack == 1
    assert SessionConfig(sentinel_master=MASTER_NAME, commit_replicas=2).replicas_to_ack == 2
