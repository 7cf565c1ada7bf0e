"""SessionStore and SessionFlow against a real redis-server started on a free port."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from cluster.config import ClusterConfig, SessionConfig
from cluster.profiles import load_profile
from cluster.sessions import (
    InvalidSessionRequest,
    SessionConflict,
    SessionFlow,
    SessionNotFound,
    SessionStore,
    SessionStoreUnavailable,
    StoredTurn,
    TruncationPolicy,
    session_id_from_request,
)
from cluster.sessions.connection import build_redis, redacted, resolve_redis_url
from cluster.sessions.keys import SessionKeys, new_session_id
from cluster.sessions.truncation import TurnShape, plan_drop
from tests.redis_server import RedisServer, persistent_redis, redis_server  # noqa: F401  (fixtures)

TENANT = "acme"


def session_cfg(url: str, **kw: object) -> SessionConfig:
    return SessionConfig(redis_url=url, redis_url_env=None, **kw)  # type: ignore[arg-type]


def make_store(url: str, *, ttl_s: float = 600, max_turns: int = 200, max_tokens: int = 1_000_000) -> SessionStore:
    cfg = session_cfg(url, retries=1, connect_timeout_s=0.5, socket_timeout_s=1.0, retry_after_s=3)
    return SessionStore(
        build_redis(cfg), ttl_s=ttl_s, policy=TruncationPolicy(max_turns, max_tokens, 0.75), retry_after_s=3
    )


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[SessionStore]:  # noqa: F811
    s = make_store(redis_server.url)
    yield s
    await s.aclose()


@pytest.fixture
async def flow(store: SessionStore) -> AsyncIterator[SessionFlow]:
    yield SessionFlow(store)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# -- concurrency ------------------------------------------------------------------------


async def test_50_concurrent_unconditional_appends_lose_nothing(store: SessionStore) -> None:
    snap = await store.create(TENANT)
    turns = [StoredTurn.of([user(f"q{i}"), assistant(f"a{i}")], 10) for i in range(50)]
    results = await asyncio.gather(*(store.append_turn(TENANT, snap.session_id, t) for t in turns))
    assert sorted(r.version for r in results) == list(range(1, 51))
    after = await store.read(TENANT, snap.session_id)
    assert after.version == 50
    assert len(after.turns) == 50
    # Every turn intact (its two messages adjacent), none twice, none missing.
    pairs = {(t.messages[0]["content"], t.messages[1]["content"]) for t in after.turns}
    assert pairs == {(f"q{i}", f"a{i}") for i in range(50)}
    hist = after.history()
    for j in range(0, 100, 2):
        assert hist[j]["content"][1:] == hist[j + 1]["content"][1:]
    assert after.tokens == 500


async def test_50_concurrent_turns_with_version_retry_lose_nothing(flow: SessionFlow) -> None:
    snap = await flow.create(TENANT)
    conflicts = 0

    async def one_turn(i: int) -> None:
        nonlocal conflicts
        while True:
            prepared = await flow.prepare(TENANT, snap.session_id, [user(f"q{i}")])
            await asyncio.sleep(0)  # "generation": let the other turns run
            try:
                await flow.commit(prepared, assistant(f"a{i}"), replica_id=f"r{i % 3}")
                return
            except SessionConflict:
                conflicts += 1

    await asyncio.gather(*(one_turn(i) for i in range(50)))
    after = await flow.read(TENANT, snap.session_id)
    assert after.version == 50 and len(after.turns) == 50
    assert {t.messages[0]["content"] for t in after.turns} == {f"q{i}" for i in range(50)}
    for t in after.turns:  # no interleaving inside a turn
        assert [m["role"] for m in t.messages] == ["user", "assistant"]
        assert t.messages[0]["content"][1:] == t.messages[1]["content"][1:]
    print(f"50 racing turns: {conflicts} conflicts retried")


async def test_racing_turns_one_wins_one_gets_409(flow: SessionFlow) -> None:
    snap = await flow.create(TENANT)
    p1 = await flow.prepare(TENANT, snap.session_id, [user("first")])
    p2 = await flow.prepare(TENANT, snap.session_id, [user("second")])
    assert p1.version == p2.version == 0
    outcomes = await asyncio.gather(
        flow.commit(p1, assistant("reply-1")), flow.commit(p2, assistant("reply-2")), return_exceptions=True
    )
    conflicts = [o for o in outcomes if isinstance(o, SessionConflict)]
    stored = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(conflicts) == 1 and len(stored) == 1
    err = conflicts[0]
    assert err.status == 409 and err.body()["error"]["code"] == "session_conflict"
    after = await flow.read(TENANT, snap.session_id)
    assert len(after.turns) == 1
    winner = "first" if outcomes[0] is stored[0] else "second"
    assert after.history() == [user(winner), assistant("reply-1" if winner == "first" else "reply-2")]


async def test_retried_commit_is_stored_once(flow: SessionFlow) -> None:
    snap = await flow.create(TENANT)
    p = await flow.prepare(TENANT, snap.session_id, [user("hello")])
    first = await flow.commit(p, assistant("hi"))
    again = await flow.commit(p, assistant("hi"))
    assert not first.duplicate and again.duplicate and again.version == first.version == 1
    assert len((await flow.read(TENANT, snap.session_id)).turns) == 1


# -- the turn -----------------------------------------------------------------------------


async def test_prepare_prepends_history_and_commit_stores_tool_calls(flow: SessionFlow) -> None:
    snap = await flow.create(TENANT, system_prompt="You are terse.")
    p1 = await flow.prepare(TENANT, snap.session_id, [user("weather in Paris?")])
    assert p1.messages == [{"role": "system", "content": "You are terse."}, user("weather in Paris?")]
    call = {"id": "call0abcd", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
    await flow.commit(p1, {"role": "assistant", "content": None, "tool_calls": [call]}, replica_id="replica-A")
    tool_result = {"role": "tool", "tool_call_id": "call0abcd", "content": "18C"}
    p2 = await flow.prepare(TENANT, snap.session_id, [tool_result])
    assert p2.affinity_replica == "replica-A"
    assert p2.history_messages == 2
    assert p2.messages == [
        {"role": "system", "content": "You are terse."},
        user("weather in Paris?"),
        {"role": "assistant", "tool_calls": [call]},
        tool_result,
    ]
    await flow.commit(p2, assistant("18C in Paris."), replica_id="replica-B")
    after = await flow.read(TENANT, snap.session_id)
    assert after.messages() == p2.messages + [assistant("18C in Paris.")]
    assert after.last_replica == "replica-B"
    assert [t.starts_with_user for t in after.turns] == [True, False]


async def test_leading_system_message_replaces_stored_prompt(flow: SessionFlow) -> None:
    snap = await flow.create(TENANT)
    sys_a = {"role": "system", "content": "A"}
    p = await flow.prepare(TENANT, snap.session_id, [sys_a, user("x")])
    assert p.system_update == [sys_a] and p.new_messages == [user("x")]
    await flow.commit(p, assistant("y"))
    p = await flow.prepare(TENANT, snap.session_id, [sys_a, user("z")])  # same prompt resent: no update
    assert p.system_update is None and p.messages == [sys_a, user("x"), assistant("y"), user("z")]
    with pytest.raises(InvalidSessionRequest):
        await flow.prepare(TENANT, snap.session_id, [sys_a])


async def test_unknown_and_malformed_session_ids(flow: SessionFlow) -> None:
    with pytest.raises(SessionNotFound) as nf:
        await flow.prepare(TENANT, new_session_id(), [user("hi")])
    assert nf.value.status == 404
    with pytest.raises(InvalidSessionRequest):
        await flow.prepare(TENANT, "bad id!", [user("hi")])
    with pytest.raises(InvalidSessionRequest):
        await flow.prepare(TENANT, new_session_id(), [{"role": "wizard", "content": "x"}])


def test_session_id_from_header_or_body() -> None:
    sid = new_session_id()
    body: dict[str, object] = {"messages": [], "session_id": sid}
    assert session_id_from_request({}, body) == sid and "session_id" not in body
    assert session_id_from_request({"x-session-id": sid}, {"messages": []}) == sid
    assert session_id_from_request({"X-Session-ID": sid}, None) == sid
    assert session_id_from_request({}, {"messages": []}) is None
    with pytest.raises(InvalidSessionRequest):
        session_id_from_request({"X-Session-ID": sid}, {"session_id": new_session_id()})
    with pytest.raises(InvalidSessionRequest):
        session_id_from_request({"X-Session-ID": "no/slashes/here"}, None)


def test_session_id_from_pydantic_bodies() -> None:
    from pydantic import BaseModel, ConfigDict

    class Declared(BaseModel):  # like vLLM 0.29's ChatCompletionRequest
        messages: list[dict[str, str]] = []
        session_id: str | None = None

    class Extra(BaseModel):
        model_config = ConfigDict(extra="allow")
        messages: list[dict[str, str]] = []

    sid = new_session_id()
    assert session_id_from_request({}, Declared(session_id=sid)) == sid
    assert session_id_from_request({}, Declared()) is None
    extra = Extra.model_validate({"messages": [], "session_id": sid})
    assert session_id_from_request({}, extra) == sid and "session_id" not in extra.model_dump()


def test_generated_ids_are_unguessable_and_keys_tenant_scoped() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 37 for i in ids)
    a, b = SessionKeys.of("mls", "acme", "sess_abcdefgh"), SessionKeys.of("mls", "globex", "sess_abcdefgh")
    assert a.meta == "mls:{acme:sess_abcdefgh}:meta" and a.turns == "mls:{acme:sess_abcdefgh}:turns"
    assert a.meta != b.meta
    for bad in ("a:b", "a{b}", "", "x" * 65):
        with pytest.raises(ValueError):
            SessionKeys.of("mls", bad, "sess_abcdefgh")


# -- tenants --------------------------------------------------------------------------------


async def test_tenant_isolation(store: SessionStore) -> None:
    mine = await store.create("acme")
    await store.append_turn("acme", mine.session_id, StoredTurn.of([user("secret"), assistant("ok")], 5))
    with pytest.raises(SessionNotFound):
        await store.read("globex", mine.session_id)
    with pytest.raises(SessionNotFound):
        await store.append_turn("globex", mine.session_id, StoredTurn.of([user("inject")], 1))
    with pytest.raises(SessionNotFound):
        await store.delete("globex", mine.session_id)
    after = await store.read("acme", mine.session_id)
    assert after.history() == [user("secret"), assistant("ok")] and after.version == 1
    # Nothing was created in the other tenant's namespace either.
    assert await store.redis.exists(*SessionKeys.of("mls", "globex", mine.session_id).as_list()) == 0
    await store.delete("acme", mine.session_id)
    with pytest.raises(SessionNotFound):
        await store.read("acme", mine.session_id)


# -- TTL ------------------------------------------------------------------------------------


async def test_ttl_expiry(redis_server: RedisServer) -> None:  # noqa: F811
    short = make_store(redis_server.url, ttl_s=0.3)
    try:
        snap = await short.create(TENANT)
        await short.append_turn(TENANT, snap.session_id, StoredTurn.of([user("a"), assistant("b")], 2))
        await asyncio.sleep(1.0)
        with pytest.raises(SessionNotFound):
            await short.read(TENANT, snap.session_id)
        with pytest.raises(SessionNotFound):
            await short.append_turn(TENANT, snap.session_id, StoredTurn.of([user("c")], 1))
        keys = SessionKeys.of("mls", TENANT, snap.session_id)
        assert await short.redis.exists(*keys.as_list()) == 0
    finally:
        await short.aclose()


async def test_ttl_refreshed_on_use(store: SessionStore) -> None:
    snap = await store.create(TENANT)
    await store.append_turn(TENANT, snap.session_id, StoredTurn.of([user("a"), assistant("b")], 2))
    keys = SessionKeys.of("mls", TENANT, snap.session_id)
    for key in keys.as_list():  # age the session: 2 s left
        await store.redis.pexpire(key, 2000)
    after = await store.read(TENANT, snap.session_id)
    assert after.expires_in_ms > 500_000  # ttl 600 s again
    for key in keys.as_list():
        assert await store.redis.pttl(key) > 500_000


# -- truncation ---------------------------------------------------------------------------


def test_plan_drop_rule() -> None:
    policy = TruncationPolicy(max_turns=8, max_tokens=10_000, keep_fraction=0.75)
    u = TurnShape(10, True)
    assert plan_drop([u] * 8, 0, policy) == 0
    assert plan_drop([u] * 9, 0, policy) == 3  # down to 6 = 0.75 * 8 turns in one chunk
    tool = TurnShape(10, False)
    # Cut at 3 would keep a tool-result turn first: move forward to the next user turn.
    assert plan_drop([u, u, u, tool, tool, u, u, u, u], 0, policy) == 5
    # No user turn left after the cut: keep the size-based cut.
    assert plan_drop([u] + [tool] * 8, 0, policy) == 3
    # Token cap: system 100 + 5 turns of 300 > 1000 -> keep <= 750 tokens.
    tok = TruncationPolicy(max_turns=100, max_tokens=1000, keep_fraction=0.75)
    assert plan_drop([TurnShape(300, True)] * 5, 100, tok) == 3
    # A single oversized turn is kept (the newest turn is never dropped).
    assert plan_drop([TurnShape(5000, True)], 0, tok) == 0


async def test_truncation_keeps_system_prompt_and_a_stable_prefix(redis_server: RedisServer) -> None:  # noqa: F811
    store = make_store(redis_server.url, max_turns=8)
    flow = SessionFlow(store)
    try:
        snap = await flow.create(TENANT, system_prompt="SYS")
        prefixes: list[list[dict[str, object]]] = []
        for i in range(20):
            p = await flow.prepare(TENANT, snap.session_id, [user(f"q{i}")])
            prefixes.append(p.messages[:-1])
            assert p.messages[0] == {"role": "system", "content": "SYS"}
            await flow.commit(p, assistant(f"a{i}"))
        after = await flow.read(TENANT, snap.session_id)
        assert after.system == [{"role": "system", "content": "SYS"}]
        assert len(after.turns) <= 8
        # Count requests whose prompt did NOT extend the previous prompt (a prefix-cache break).
        breaks = sum(1 for a, b in zip(prefixes, prefixes[1:], strict=False) if b[: len(a)] != a)
        # 20 turns under a cap of 8 dropping to 6: breaks only at turns 9, 12, 15, 18.
        assert breaks == 4
        assert after.dropped_turns == 12 and [t.messages[0]["content"] for t in after.turns][-1] == "q19"
    finally:
        await store.aclose()


async def test_lua_truncation_matches_reference(redis_server: RedisServer) -> None:  # noqa: F811
    rng = random.Random(7)
    for trial in range(12):
        policy = TruncationPolicy(rng.randint(2, 10), rng.randint(50, 400), rng.choice([0.5, 0.75, 0.9]))
        store = SessionStore(build_redis(session_cfg(redis_server.url)), ttl_s=60, policy=policy)
        try:
            snap = await store.create(TENANT, system=[{"role": "system", "content": "s"}], system_tokens=7)
            model: list[TurnShape] = []
            for _ in range(rng.randint(5, 25)):
                shape = TurnShape(rng.randint(1, 80), rng.random() < 0.6)
                first = user("u") if shape.starts_with_user else {"role": "tool", "tool_call_id": "x", "content": "t"}
                turn = StoredTurn.of([first, assistant("a")], shape.tokens)
                res = await store.append_turn(TENANT, snap.session_id, turn)
                model.append(shape)
                drop = plan_drop(model, 7, policy)
                model = model[drop:]
                assert res.dropped_turns == drop, (trial, policy)
                assert res.turns == len(model) and res.tokens == 7 + sum(t.tokens for t in model)
            after = await store.read(TENANT, snap.session_id)
            assert [(t.tokens, t.starts_with_user) for t in after.turns] == [
                (t.tokens, t.starts_with_user) for t in model
            ]
        finally:
            await store.aclose()


# -- failure and recovery ---------------------------------------------------------------


async def test_redis_restart_mid_conversation(persistent_redis: RedisServer) -> None:  # noqa: F811
    store = make_store(persistent_redis.url)
    flow = SessionFlow(store)
    try:
        snap = await flow.create(TENANT, system_prompt="persist me")
        for i in range(3):
            p = await flow.prepare(TENANT, snap.session_id, [user(f"q{i}")])
            await flow.commit(p, assistant(f"a{i}"), replica_id="r1")
        pending = await flow.prepare(TENANT, snap.session_id, [user("q3")])

        persistent_redis.stop(kill=True)  # a crash: appendfsync always keeps every acknowledged write
        with pytest.raises(SessionStoreUnavailable) as down:
            await flow.prepare(TENANT, snap.session_id, [user("during outage")])
        err = down.value
        assert err.status == 503 and err.headers == {"Retry-After": "3"}
        assert "unavailable" in err.body()["error"]["message"]
        with pytest.raises(SessionStoreUnavailable):
            await flow.commit(pending, assistant("a3"))
        with pytest.raises(SessionStoreUnavailable):
            await flow.create(TENANT)
        assert await store.ping() is False

        persistent_redis.start()  # same port, same AOF; the client reconnects by itself
        after = await flow.read(TENANT, snap.session_id)
        assert after.version == 3 and after.last_replica == "r1"
        assert after.messages()[0] == {"role": "system", "content": "persist me"}
        assert [m["content"] for m in after.history()] == ["q0", "a0", "q1", "a1", "q2", "a2"]
        # The turn prepared before the outage can still commit (scripts are reloaded: NOSCRIPT handled).
        await flow.commit(pending, assistant("a3"))
        assert (await flow.read(TENANT, snap.session_id)).version == 4
        assert await store.ping() is True
    finally:
        await store.aclose()


async def test_unreachable_redis_is_503() -> None:
    from tests.redis_server import free_port

    store = make_store(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(SessionStoreUnavailable) as exc:
            await store.read(TENANT, new_session_id())
        assert "ConnectionError" in exc.value.message
    finally:
        await store.aclose()


# -- connection configuration ------------------------------------------------------------


async def test_tls_and_auth_url() -> None:
    server = RedisServer(tls=True, password="s3cret-pw").start()
    try:
        cfg = session_cfg(server.url, tls_ca_file=str(server.tls_files["ca"]))
        assert server.url.startswith("rediss://")
        client = build_redis(cfg)
        assert await client.ping()
        store = SessionStore(client, ttl_s=60, policy=TruncationPolicy(10, 1000))
        snap = await store.create(TENANT)
        assert (await store.read(TENANT, snap.session_id)).version == 0
        await store.aclose()
        wrong = SessionStore(
            build_redis(session_cfg(server.url.replace("s3cret-pw", "wrong"), tls_ca_file=str(server.tls_files["ca"]))),
            ttl_s=60,
            policy=TruncationPolicy(10, 1000),
        )
        with pytest.raises(SessionStoreUnavailable) as exc:
            await wrong.read(TENANT, snap.session_id)
        assert "s3cret" not in exc.value.message and "wrong" not in exc.value.message
        await wrong.aclose()
    finally:
        server.cleanup()


async def test_sentinel_discovers_master() -> None:
    master = RedisServer(password="m-pw").start()
    sentinel = RedisServer(sentinel_for=master).start()
    try:
        cfg = session_cfg(f"redis://:m-pw@127.0.0.1:{sentinel.port},127.0.0.1:{sentinel.port}/0",
                          sentinel_master="mymaster")  # fmt: skip
        store = SessionStore(build_redis(cfg), ttl_s=60, policy=TruncationPolicy(10, 1000))
        snap = await store.create(TENANT)
        direct = Redis.from_url(master.url, decode_responses=True)
        assert await direct.exists(SessionKeys.of("mls", TENANT, snap.session_id).meta) == 1
        await direct.aclose()
        await store.aclose()
    finally:
        sentinel.cleanup()
        master.cleanup()


def test_url_resolution_and_redaction() -> None:
    cfg = SessionConfig(redis_url="redis://localhost:6380/0", redis_url_env="MY_REDIS")
    assert resolve_redis_url(cfg, {}) == "redis://localhost:6380/0"
    assert resolve_redis_url(cfg, {"MY_REDIS": "rediss://:pw@h:1/2"}) == "rediss://:pw@h:1/2"
    assert redacted("rediss://user:pw@h:1/2") == "rediss://user:***@h:1/2"
    with pytest.raises(ValueError):
        build_redis(cfg, url="http://nope")


def test_store_from_config_defaults_max_tokens_to_half_the_largest_pool() -> None:
    cfg: ClusterConfig = load_profile("cpu-tiny")
    flow = SessionFlow.from_config(cfg, redis=Redis())
    assert flow.store is not None and flow.store.policy.max_tokens == cfg.max_context // 2
    off = cfg.model_copy(update={"sessions": SessionConfig(enabled=False)})
    assert SessionFlow.from_config(off).enabled is False


@pytest.fixture(autouse=True)
def _no_leaked_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CLUSTER_REDIS_URL", raising=False)
    yield
