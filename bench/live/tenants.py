"""`cluster bench tenants`: the noisy-neighbour figures of the gateway's fair share.

Tenant B sends one chat request at a time; tenant A floods with `--flood` concurrent
clients. B's time to first token (p50/p99) is measured through the real gateway app
(every step: auth, tokenize, admit, choose_pool, fair_share, ...) in three runs: B alone,
A flooding with the fair queue off (every request goes straight to the engines, which
serve in arrival order), and A flooding with the fair queue on. The engines are a model,
not vLLM: `--slots` requests at a time per pool (a continuous batch), each holding its
slot for `--service-ms`, the first token `--prefill-ms` after it got one; waiting
requests are served first come, first served, as vLLM's default scheduler does.

    python -m bench.live.tenants --flood 64 --slots 8 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from cluster.auth import hash_api_key
from cluster.gateway import build_gateway
from cluster.gateway.app import build_gateway_app
from cluster.gateway.context import EngineChunk, RequestKind
from cluster.profiles import load_profile
from cluster.routing.hints import HintBoard
from cluster.tokenizer import PromptTokenizer
from cluster.upstream import vllm as upstream_vllm

KEYS = {"A": "bench-key-a", "B": "bench-key-b"}


class SlotEngine:
    """Engines as `slots` FIFO slots per pool, a fixed service time per request."""

    def __init__(self, board: HintBoard, slots: int, service_s: float, prefill_s: float) -> None:
        self.board, self.service_s, self.prefill_s = board, service_s, prefill_s
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.n = slots

    async def generate(
        self,
        pool: str,
        kind: RequestKind,
        body: Any,
        *,
        session_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        hint = self.board.get(body.request_id)
        if hint is not None:
            hint.chosen_replica = f"{pool}-0"
        slot = self.slots.setdefault(pool, asyncio.Semaphore(self.n))
        async with slot:  # asyncio.Semaphore wakes waiters in FIFO order
            await asyncio.sleep(self.prefill_s)
            choice = {"index": 0, "delta": {"role": "assistant", "content": "x"}}
            yield EngineChunk({"object": "chat.completion.chunk", "choices": [choice]})
            await asyncio.sleep(self.service_s - self.prefill_s)
            done = {"index": 0, "delta": {}, "finish_reason": "stop"}
            usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
            yield EngineChunk({"object": "chat.completion.chunk", "choices": [done], "usage": usage})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app(args: argparse.Namespace, fair: bool, tokenizer: PromptTokenizer) -> Any:
    cfg = load_profile("cpu-tiny")
    cfg.pools = cfg.pools[:1]  # one pool: no spill, the queue is the only lever
    cfg.pools[0].min_replicas = cfg.pools[0].max_replicas = 1
    cfg.auth.enabled, cfg.auth.api_keys_env = True, None
    cfg.auth.tenants = {t: [hash_api_key(k)] for t, k in KEYS.items()}
    cfg.admission.queue.enabled = fair
    cfg.admission.queue.in_flight_per_replica = args.slots
    cfg.admission.queue.max_queued_per_pool = 10 * args.flood
    cfg.admission.queue.deadline_s = 60
    board = HintBoard()
    engine = SlotEngine(board, args.slots, args.service_ms / 1000, args.prefill_ms / 1000)
    gateway = build_gateway(
        cfg, engine, request_models=upstream_vllm.request_models(), tokenizer=tokenizer, board=board
    )
    gateway.fleet.update({cfg.pools[0].name: 1}, 1)
    return build_gateway_app(gateway)


async def _ttft(client: httpx.AsyncClient, tenant: str) -> float:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {await r.aread()!r}")
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - start
        assert first is not None
        return first


async def _scenario(args: argparse.Namespace, fair: bool, flood: int, tokenizer: PromptTokenizer) -> dict[str, Any]:
    app = _app(args, fair, tokenizer)
    # A real HTTP server: httpx's in-process ASGI transport would buffer the stream.
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as c:
        await _ttft(c, "B")  # warm-up: the first request pays one-off costs
        stop = time.monotonic() + args.duration
        a_done = 0

        async def flooder() -> None:
            nonlocal a_done
            while time.monotonic() < stop:
                await _ttft(c, "A")
                a_done += 1

        flooders = [asyncio.create_task(flooder()) for _ in range(flood)]
        await asyncio.sleep(min(0.5, args.duration / 4) if flood else 0)  # let the flood build up
        b: list[float] = []
        while time.monotonic() < stop:
            b.append(await _ttft(c, "B"))
        await asyncio.gather(*flooders)
    server.should_exit = True
    await serving
    qs = statistics.quantiles(b, n=100) if len(b) >= 2 else [b[0]] * 99
    return {
        "scenario": "B alone" if not flood else f"A floods ({flood}), fair share {'on' if fair else 'off'}",
        "b_requests": len(b),
        "b_ttft_p50_ms": round(statistics.median(b) * 1000, 1),
        "b_ttft_p99_ms": round(qs[98] * 1000, 1),
        "a_requests": a_done,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flood", type=int, default=64, help="tenant A's concurrent clients")
    parser.add_argument("--slots", type=int, default=8, help="requests the pool's engines run at once")
    parser.add_argument("--service-ms", type=float, default=100.0, help="time a request holds its slot")
    parser.add_argument("--prefill-ms", type=float, default=10.0, help="first token after getting a slot")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
    tokenizer = PromptTokenizer()
    rows = [
        asyncio.run(_scenario(args, fair=True, flood=0, tokenizer=tokenizer)),
        asyncio.run(_scenario(args, fair=False, flood=args.flood, tokenizer=tokenizer)),
        asyncio.run(_scenario(args, fair=True, flood=args.flood, tokenizer=tokenizer)),
    ]
    print(f"[tenants] engines: {args.slots} slots, {args.service_ms:g} ms per request "
          f"(first token at {args.prefill_ms:g} ms); {args.duration:g} s per scenario")  # fmt: skip
    print(f"{'scenario':38} {'B reqs':>7} {'B TTFT p50':>11} {'B TTFT p99':>11} {'A reqs':>7}")
    for r in rows:
        print(f"{r['scenario']:38} {r['b_requests']:>7} {r['b_ttft_p50_ms']:>9.1f}ms {r['b_ttft_p99_ms']:>9.1f}ms "
              f"{r['a_requests']:>7}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster bench tenants", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
