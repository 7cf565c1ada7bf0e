"""Session store on Redis with Sentinel: a failover mid-conversation loses no acknowledged turn.

Real processes: one master and two replicas (redis-server, tests/redis_server.py) and three
Sentinels (Debian's `redis-sentinel`, quorum 2, down-after 1 s). The store is built from the
typed config exactly as the gateway builds it (`sessions.sentinel_master`, the URL listing the
Sentinels), so commits WAIT for one replica (the default with Sentinel). Conversations go
through SessionFlow (the gateway's prepare -> commit) and retry a 503 as a client would.

The bound without replica acks (`sessions.commit_replicas: 0`): a failover loses the turns
acknowledged but not yet replicated. On one machine replication is too fast to show it by
chance, so one test routes replication through links that hold the master's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
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
                    # A split vote retries after 2x this: keep it short for the tests.
                    f"sentinel failover-timeout {MASTER_NAME} 4000",
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


class ReplicationLink:
    """A TCP forwarder a replica replicates through. `hold()` keeps what the master sends
    from reaching the replica; `cut()` then drops it and closes the link, as if the master
    died with the writes still unsent: the deterministic form of replication lag."""

    def __init__(self, master_port: int) -> None:
        self.master_port = master_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.held = threading.Event()
        self.held_bytes = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                replica, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                master = socket.create_connection(("127.0.0.1", self.master_port), timeout=1)
                master.settimeout(None)
            except OSError:
                replica.close()
                continue
            self.sockets += [replica, master]
            threading.Thread(target=self._pump, args=(replica, master, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(master, replica, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_master: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_master and self.held.is_set():
                    self.held_bytes += len(data)  # never delivered
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def hold(self) -> None:
        self.held.set()

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _replicate(replica: RedisServer, master_port: int) -> None:
    client = redis.Redis(port=replica.port, decode_responses=True)
    client.replicaof("127.0.0.1", master_port)
    deadline = time.monotonic() + 10
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {replica.port} never linked to {master_port}")
        time.sleep(0.05)


def _wait_replicated(master: RedisServer, replicas: int) -> None:
    """Until `replicas` replicas have acknowledged the master's whole stream."""
    client = redis.Redis(port=master.port, decode_responses=True)
    deadline = time.monotonic() + 10
    while True:
        info = client.info("replication")
        offsets = [int(v["offset"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if sum(o >= int(info["master_repl_offset"]) for o in offsets) >= replicas:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not catch up: {info}")
        time.sleep(0.05)


def _topology(links: list[ReplicationLink] | None = None) -> Iterator[Topology]:
    master = RedisServer().start()
    # Full syncs start at once (the default waits 5 s for more replicas to join one transfer).
    redis.Redis(port=master.port).config_set("repl-diskless-sync-delay", 0)
    replicas = [RedisServer().start() for _ in range(2)]
    if links is not None:
        links += [ReplicationLink(master.port) for _ in replicas]
    for i, r in enumerate(replicas):
        _replicate(r, links[i].port if links is not None else master.port)
    sentinels = [SentinelServer(master.port, [r.port for r in replicas], quorum=2).start() for _ in range(3)]
    topo = Topology(master, replicas, sentinels, {s.port: s for s in [master, *replicas]})
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
        for link in links or []:
            link.close()
        for r in [master, *replicas]:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            r.cleanup()


@pytest.fixture
def topology() -> Iterator[Topology]:
    yield from _topology()


@pytest.fixture
def links() -> list[ReplicationLink]:
    return []


@pytest.fixture
def lagging_topology(links: list[ReplicationLink]) -> Iterator[Topology]:
    """Replicas replicate through ReplicationLinks (`links`), so a test can stall them."""
    yield from _topology(links)


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


@contextlib.contextmanager
def replicas_frozen(topology: Topology) -> Iterator[None]:
    """Every Redis replica SIGSTOPped for the block (SIGCONT after it, whatever happens)."""
    procs = [r.proc for r in topology.replicas]
    assert all(procs)
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]


async def test_a_commit_no_replica_confirms_is_not_acknowledged(topology: Topology) -> None:
    """WAIT is enforced: with both replicas frozen the commit gets 503 after the timeout;
    retried after they resume, the same turn is stored exactly once."""
    cfg = sentinel_config(topology, commit_replica_timeout_ms=300)
    flow = SessionFlow.from_config(cfg)
    assert flow.store is not None
    sid = (await flow.store.create(TENANT)).session_id
    prepared = await flow.prepare(TENANT, sid, [{"role": "user", "content": "hello"}])
    with replicas_frozen(topology):
        t0 = time.monotonic()
        with pytest.raises(SessionStoreUnavailable, match="confirmed by 0 of 1 replica"):
            await flow.commit(prepared, {"role": "assistant", "content": "hi"})
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 2.0
    # Retried as a client would (same turn id): just after SIGCONT a replica may still be
    # reconnecting, so a retry can again go unconfirmed; bounded.
    retry_until = time.monotonic() + 20
    while True:
        try:
            result = await flow.commit(prepared, {"role": "assistant", "content": "hi"})
            break
        except SessionStoreUnavailable:
            assert time.monotonic() < retry_until, "no replica confirmed the commit 20 s after they resumed"
            await asyncio.sleep(0.2)
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
    with replicas_frozen(topology):
        t0 = time.monotonic()
        result = await flow.commit(prepared, {"role": "assistant", "content": "hi"})
        assert time.monotonic() - t0 < 0.3 and not result.duplicate
    await flow.store.aclose()


def test_commit_timeout_must_fit_in_the_socket_timeout() -> None:
    with pytest.raises(ValueError, match="commit_replica_timeout_ms"):
        SessionConfig(sentinel_master=MASTER_NAME, socket_timeout_s=1.0, commit_replica_timeout_ms=1000)
    assert SessionConfig().replicas_to_ack == 0  # a single Redis has no replica to wait for
    assert SessionConfig(sentinel_master=MASTER_NAME).replicas_to_ack == 1
    assert SessionConfig(sentinel_master=MASTER_NAME, commit_replicas=2).replicas_to_ack == 2


@pytest.mark.parametrize("commit_replicas", [1, 0])
async def test_replication_lag_at_failover_loses_acknowledged_turns_only_without_replica_acks(
    lagging_topology: Topology, links: list[ReplicationLink], commit_replicas: int
) -> None:
    """The bound, made deterministic: the replicas lag (their links hold what the master
    sends) when the master dies mid-turn. With commit_replicas 1 that turn is refused (503),
    retried after the failover and stored: nothing acknowledged is lost. With 0 it is
    acknowledged at once and lost with the master: asynchronous replication loses the
    acknowledged turns the replicas had not received."""
    topo = lagging_topology
    cfg = sentinel_config(topo, commit_replicas=commit_replicas, commit_replica_timeout_ms=300)
    flow = SessionFlow.from_config(cfg)
    assert flow.store is not None
    sid = (await flow.store.create(TENANT)).session_id
    acked: list[str] = []
    stats: dict[str, int] = {}
    deadline = time.monotonic() + 60
    await _conversation(flow, sid, 3, acked, stats, deadline)
    await asyncio.to_thread(_wait_replicated, topo.master, 2)

    for link in links:
        link.hold()
    prepared = await flow.prepare(TENANT, sid, [{"role": "user", "content": "the lagging turn"}])
    reply = {"role": "assistant", "content": "reply"}
    if commit_replicas:
        with pytest.raises(SessionStoreUnavailable, match="confirmed by 0 of 1"):
            await flow.commit(prepared, reply)
    else:
        await flow.commit(prepared, reply)
        acked.append("the lagging turn")
    old = topo.master
    old.stop(kill=True)
    for link in links:
        link.cut()
    assert all(link.held_bytes > 0 for link in links)  # the turn was sent and never arrived
    new = await asyncio.to_thread(topo.wait_for_new_master, old)
    assert new in topo.replicas

    if commit_replicas:  # the client retries its 503: the same turn, now on the new master
        await _retrying(lambda: flow.commit(prepared, reply), "commit_503", stats, deadline)
        acked.append("the lagging turn")
    snap = await flow.store.read(TENANT, sid)
    stored = [t.messages[0]["content"] for t in snap.turns]
    if commit_replicas:
        assert stored == acked  # nothing acknowledged is lost
    else:
        assert stored == acked[:-1]  # the acknowledged lagging turn is gone
    await flow.store.aclose()
