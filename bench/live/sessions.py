"""`cluster bench sessions`: throughput and latency of session turns against Redis.

One operation = one stateful turn's Redis work, exactly what the gateway does per
request: `SessionFlow.prepare` (read the session, refresh its TTL) then
`SessionFlow.commit` (append user message + reply with the version check and
truncation). Each client owns a session pre-filled with `--history-turns` turns, so
every read returns a realistic history; `--contention` adds a run where all clients
share ONE session (optimistic concurrency: conflicts retried, counted).

By default a private redis-server is started on a free port (no persistence, or
`--appendonly` for `appendonly yes` + `appendfsync everysec`); `--redis-url` targets an
existing one (keys go under a throwaway prefix and are deleted afterwards).

    python -m bench.live.sessions --clients 1,16,64 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import SessionConfig
from cluster.sessions import SessionConflict, SessionFlow, SessionStore, TruncationPolicy
from cluster.sessions.connection import build_redis, redacted


class LocalRedis:
    """A throwaway redis-server on a free port."""

    def __init__(self, appendonly: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH; install it or pass --redis-url")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.dir = tempfile.mkdtemp(prefix="sessions-bench-")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
               "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class LevelResult:
    label: str
    clients: int
    turns: int
    seconds: float
    turn_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)
    append_ms: list[float] = field(default_factory=list)
    conflicts: int = 0

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds if self.seconds else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "run": self.label,
            "clients": self.clients,
            "turns": self.turns,
            "turns_per_s": round(self.turns_per_s, 1),
            "turn_p50_ms": round(percentile(self.turn_ms, 50), 3),
            "turn_p99_ms": round(percentile(self.turn_ms, 99), 3),
            "read_p99_ms": round(percentile(self.read_ms, 99), 3),
            "append_p99_ms": round(percentile(self.append_ms, 99), 3),
            "conflicts": self.conflicts,
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _text(n: int, seed: int) -> str:
    words = ("alpha", "beta", "gamma", "delta", "kv", "cache", "prefix", "replica", "route", "token")
    out: list[str] = []
    size, i = 0, seed
    while size < n:
        out.append(words[i % len(words)])
        size += len(out[-1]) + 1
        i = i * 31 + 7
    return " ".join(out)[:n]


async def _fill(flow: SessionFlow, tenant: str, turns: int, user_chars: int, reply_chars: int) -> str:
    snap = await flow.create(tenant, system_prompt=_text(400, 1))
    for t in range(turns):
        p = await flow.prepare(tenant, snap.session_id, [{"role": "user", "content": _text(user_chars, t)}])
        await flow.commit(p, {"role": "assistant", "content": _text(reply_chars, t + 1)}, replica_id="replica-0")
    return snap.session_id


async def _run_level(
    flow: SessionFlow, label: str, clients: int, duration_s: float, args: argparse.Namespace, shared: bool
) -> LevelResult:
    tenant = "bench"
    if shared:
        sid = await _fill(flow, tenant, args.history_turns, args.user_chars, args.reply_chars)
        sids = [sid] * clients
    else:
        sids = list(
            await asyncio.gather(
                *(_fill(flow, tenant, args.history_turns, args.user_chars, args.reply_chars) for _ in range(clients))
            )
        )
    result = LevelResult(label, clients, 0, 0.0)
    stop_at = time.perf_counter() + duration_s

    # Texts made up front, so the clients measure Redis work, not text generation.
    users = [{"role": "user", "content": _text(args.user_chars, k)} for k in range(64)]
    replies = [{"role": "assistant", "content": _text(args.reply_chars, k + 1)} for k in range(64)]

    async def client(i: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            user, reply = users[(i + n) % 64], replies[(i * 7 + n) % 64]
            t0 = time.perf_counter()
            while True:
                p = await flow.prepare(tenant, sids[i], [user])
                t1 = time.perf_counter()
                try:
                    await flow.commit(p, reply, replica_id=f"replica-{i % 4}")
                    break
                except SessionConflict:
                    result.conflicts += 1
            t2 = time.perf_counter()
            result.read_ms.append((t1 - t0) * 1000)
            result.append_ms.append((t2 - t1) * 1000)
            result.turn_ms.append((t2 - t0) * 1000)
            result.turns += 1
            n += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    result.seconds = time.perf_counter() - start
    for sid in set(sids):
        await flow.delete(tenant, sid)
    return result


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


async def _bench(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    cfg = SessionConfig(redis_url=url, redis_url_env=None, pool_size=max(levels) + 4, key_prefix="mlsbench")
    store = SessionStore(
        build_redis(cfg),
        ttl_s=600,
        policy=TruncationPolicy(max_turns=args.max_turns, max_tokens=10**9, keep_fraction=0.75),
        prefix="mlsbench",
    )
    flow = SessionFlow(store)
    rows: list[dict[str, Any]] = []
    try:
        await store.redis.ping()
        for clients in levels:
            res = await _run_level(flow, "own session", clients, args.duration, args, shared=False)
            rows.append(res.row())
            print(f"[sessions] {clients:3d} clients: {res.turns_per_s:8.1f} turns/s, "
                  f"p99 {rows[-1]['turn_p99_ms']} ms", flush=True)  # fmt: skip
        if args.contention:
            res = await _run_level(flow, "one shared session", args.contention, args.duration, args, shared=True)
            rows.append(res.row())
            print(f"[sessions] shared session, {args.contention} clients: {res.turns_per_s:.1f} turns/s, "
                  f"{res.conflicts} conflicts retried", flush=True)  # fmt: skip
    finally:
        await flow.aclose()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting a private one")
    parser.add_argument("--appendonly", action="store_true", help="private Redis with appendonly yes (everysec)")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--history-turns", type=int, default=10, help="turns pre-filled in each session")
    parser.add_argument("--max-turns", type=int, default=20, help="session cap (truncation keeps 75%%)")
    parser.add_argument("--user-chars", type=int, default=300)
    parser.add_argument("--reply-chars", type=int, default=800)
    parser.add_argument("--contention", type=int, default=16, help="clients sharing one session (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
    server = None if args.redis_url else LocalRedis(args.appendonly)
    url = args.redis_url or (server.url if server else "")
    print(f"[sessions] Redis {redacted(url)} ({'private' if server else 'external'}); "
          f"{args.duration:g} s per level, history {args.history_turns} turns, "
          f"turn = read+append of {args.user_chars}+{args.reply_chars} chars", flush=True)  # fmt: skip
    try:
        rows = asyncio.run(_bench(args, url))
    finally:
        if server:
            server.stop()
    print()
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster bench sessions", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
