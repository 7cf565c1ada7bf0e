"""Test doubles for the gateway's Ray seam: an `EngineClient` that answers like a vLLM
engine behind Ray Serve (stream chunks, or one whole response) and, like the pool's
router, writes the chosen replica into the request's routing hint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from opentelemetry.trace import Tracer

from cluster.config import ClusterConfig
from cluster.gateway import Gateway, build_gateway
from cluster.gateway.app import build_gateway_app
from cluster.gateway.context import EngineChunk, RequestKind
from cluster.routing.hints import HINTS, HintBoard
from cluster.routing.replica_health import ReplicaHealth
from cluster.sessions import SessionFlow
from cluster.tokenizer import PromptTokenizer
from cluster.upstream import vllm as upstream_vllm

_TOKENIZER: PromptTokenizer | None = None


def shared_tokenizer() -> PromptTokenizer:
    """One tokenizer per test process (loading it takes about a second)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = PromptTokenizer()
    return _TOKENIZER


def echo_reply(body: Any) -> str:
    """What the fake engine answers: how many messages it was sent, and the last one."""
    if getattr(body, "messages", None) is not None:
        messages = body.messages
        return f"seen {len(messages)}: {messages[-1].get('content')}"
    return f"completion of {body.prompt!r}"


class FakeEngine:
    """Answers every request with `echo_reply`; records each call. `fail` (an exception
    to raise before the first chunk) and `fail_after` (chunks before raising) inject
    failures."""

    def __init__(self, board: HintBoard = HINTS, replica: str = "replica-1") -> None:
        self.board = board
        self.health = ReplicaHealth()
        self.replica = replica
        self.calls: list[tuple[str, RequestKind, Any]] = []
        self.fail: Callable[[], Exception] | None = None
        self.fail_after: int | None = None
        self.headers: list[dict[str, str]] = []  # the headers of each call
        self.reason = "min-ttft"  # the routing reason written into the hint
        self.matched_blocks = 0
        self.cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens

    async def generate(
        self,
        pool: str,
        kind: RequestKind,
        body: Any,
        *,
        session_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        self.calls.append((pool, kind, body))
        self.headers.append(dict(headers or {}))
        hint = self.board.get(body.request_id)
        if hint is not None:  # as the pool's router does
            hint.chosen_replica, hint.reason, hint.routed_at = self.replica, self.reason, time.monotonic()
            hint.matched_blocks = self.matched_blocks
        if self.fail is not None:
            raise self.fail()
        text = echo_reply(body)
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        usage: dict[str, Any] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if not body.stream:
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            yield EngineChunk(
                {
                    "id": "x",
                    "object": obj,
                    "created": created,
                    "model": body.model,
                    "choices": [choice],
                    "usage": usage,
                },
                whole=True,
            )
            return
        pieces = [text[:4], text[4:]]
        for i, piece in enumerate(pieces):
            if self.fail_after is not None and i >= self.fail_after:
                from cluster.gateway.engine import EngineUnavailable

                raise EngineUnavailable("replica died")
            delta = {"content": piece} if kind == "chat" else {}
            choice = {"index": 0, "delta": delta} if kind == "chat" else {"index": 0, "text": piece}
            yield EngineChunk({"id": "x", "object": f"{obj}.chunk", "created": created, "choices": [choice]})
        last: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        end: dict[str, Any] = {"delta": {}} if kind == "chat" else {"text": ""}
        last.update(end)
        yield EngineChunk({"id": "x", "object": f"{obj}.chunk", "created": created, "choices": [last], "usage": usage})


def fake_gateway(
    cfg: ClusterConfig, engine: FakeEngine, sessions: SessionFlow | None = None, tracer: Tracer | None = None
) -> Gateway:
    gateway = build_gateway(
        cfg,
        engine,
        request_models=upstream_vllm.request_models(),
        sessions=sessions,
        tokenizer=shared_tokenizer(),
        board=engine.board,
        health=engine.health,
        tracer=tracer,
    )
    # As if the controller had answered: every configured replica is running.
    gateway.fleet.update({p.name: p.start_replicas for p in cfg.pools}, 1)
    return gateway


def fake_gateway_app(cfg: ClusterConfig, engine: FakeEngine, sessions: SessionFlow | None = None) -> Any:
    return build_gateway_app(fake_gateway(cfg, engine, sessions))


def next_token(context: list[int]) -> int:
    """The fake model: each token is a function of the context so far, so a continuation
    from prompt + sent tokens produces exactly what an uninterrupted stream would have."""
    return 100 + (sum(context[-3:]) + 7 * len(context)) % 900


class TokenEngine:
    """A pool of fake replicas generating `next_token` sequences, as a router would pick
    them (the first not excluded by the request's hint or the gateway's health board).
    `faults[replica]` injects a failure: "before" (before the first chunk), "hang" (never
    answers), "hang-after-N" (wedged after N token chunks), "slow-S" (answers after S
    seconds: a starved engine) or an int (dies after that many token chunks); each fault
    fires once. Every pool routes to all of `replicas`, as its router reports them to the
    health board."""

    def __init__(self, replicas: list[str], board: HintBoard, health: ReplicaHealth) -> None:
        self.replicas = replicas
        self.board = board
        self.health = health
        for pool in ("standard", "long"):
            health.set_pool(pool, replicas)
        self.faults: dict[str, str | int] = {}
        self.calls: list[tuple[str, str, Any, str]] = []  # (pool, kind, body, replica)

    def _choose(self, body: Any) -> tuple[str, list[int]]:
        hint = self.board.get(body.request_id)
        assert hint is not None, "the gateway posts a hint before every engine call"
        usable = [r for r in self.replicas if r not in hint.excluded_replicas and not self.health.is_excluded(r)]
        replica = (usable or self.replicas)[0]
        hint.chosen_replica = replica
        return replica, list(hint.prompt_token_ids)

    async def generate(
        self,
        pool: str,
        kind: RequestKind,
        body: Any,
        *,
        session_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        from cluster.gateway.engine import EngineUnavailable

        replica, context = self._choose(body)
        self.calls.append((pool, kind, body, replica))
        fault = self.faults.pop(replica, None)
        if fault == "before":
            raise EngineUnavailable(f"{replica} died")
        if fault == "hang":  # a wedged engine: nothing comes until the request is abandoned
            await asyncio.sleep(3600)
        if isinstance(fault, str) and fault.startswith("slow-"):
            await asyncio.sleep(float(fault.split("-", 1)[1]))
        limit = body.max_tokens if body.max_tokens is not None else 16
        obj = "chat.completion" if kind == "chat" else "text_completion"
        ids: list[int] = []
        if not body.stream:
            for _ in range(limit):
                ids.append(next_token(context + ids))
            text = "".join(f"<{t}>" for t in ids)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
            usage = {"prompt_tokens": len(context), "completion_tokens": limit, "total_tokens": len(context) + limit}
            yield EngineChunk({"id": "w", "object": obj, "created": 1, "model": body.model, "choices": [choice],
                               "usage": usage}, whole=True)  # fmt: skip
            return
        head = {"id": f"s-{replica}", "object": f"{obj}.chunk" if kind == "chat" else obj, "created": 1,
                "model": body.model}  # fmt: skip
        if kind == "chat":
            yield EngineChunk({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(limit):
            if isinstance(fault, int) and i >= fault:
                raise EngineUnavailable(f"{replica} died mid-stream")
            if fault == "cancelled" and i >= 3:  # Serve cancels the call on a stopping replica
                raise asyncio.CancelledError()
            if isinstance(fault, str) and fault.startswith("hang-after-") and i >= int(fault.rsplit("-", 1)[1]):
                await asyncio.sleep(3600)  # wedged mid-stream: nothing more comes
            t = next_token(context + ids)
            ids.append(t)
            finish = "length" if i == limit - 1 else None
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {"content": f"<{t}>"}} if kind == "chat" else {"text": f"<{t}>"})
            if getattr(body, "return_token_ids", False):
                choice["token_ids"] = [t]
            yield EngineChunk({**head, "choices": [choice]})
        options = getattr(body, "stream_options", None)
        if options is not None and getattr(options, "include_usage", False):
            usage = {"prompt_tokens": len(context), "completion_tokens": limit, "total_tokens": len(context) + limit}
            yield EngineChunk({**head, "choices": [], "usage": usage})
