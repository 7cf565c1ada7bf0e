"""The app's ingress: one public model name in front of several engine pools.

A thin subclass of ray.serve.llm's `OpenAiIngress`: we keep its FastAPI app
(middlewares, request ids, HTTP metrics), its call into the engine handle, the
first-chunk error check and the SSE wrapper (`_process_llm_request`), and add, per
request, the steps that make this a cluster rather than one model:

    check model -> authenticate (tenant) -> session (history) -> count prompt tokens once
    -> choose pool (PoolSelector) -> post RoutingHint -> call the pool's handle
    -> headers X-Pool / X-Served-By / X-Prompt-Tokens -> HINTS.finish(held tokens)

Auth (cluster.auth) maps the bearer key to a tenant. A chat request with a session id
(header `X-Session-ID` or body `session_id`) goes through cluster.sessions.SessionFlow:
the stored history is prepended before tokenizing, the session's last replica becomes the
router's affinity hint, and the turn is committed to Redis when the reply is complete
(streamed: just before `[DONE]`; a client that leaves earlier stores nothing). Requests
without a session id never touch Redis, so they are served while Redis is down.

Routing hints are posted under `request_id`, which the gateway also writes into the
request body (`ChatCompletionRequest.request_id` / `CompletionRequest.request_id`), so
the pool's RequestRouter (running in this process) finds the hint as
`HINTS.get(pending_request.args[0].request_id)`. The id is Serve's internal request id
(unique per HTTP request, also `pending_request.metadata.internal_request_id`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init, make_fastapi_ingress
from ray.llm._internal.serve.core.ingress.utils import NON_STREAMING_RESPONSE_TYPES, _sanitize_chat_completion_request
from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster import errors
from cluster.auth import TenantAuthenticator
from cluster.config import ClusterConfig
from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.hints import HINTS, RoutingHint
from cluster.routing.pool_selector import ContextTooLong, PoolLoad, PoolSelector
from cluster.sessions import (
    PreparedTurn,
    ReplyAccumulator,
    SessionFlow,
    session_id_from_request,
)
from cluster.sessions import api as session_api
from cluster.telemetry import configure_tracing, tracer
from cluster.tokenizer import PromptTokenizer

logger = logging.getLogger("ray.serve")  # lands in the replica's Serve log
_tracer = tracer("cluster.gateway")

STATUS_REFRESH_S = 5.0


def engine_deployment_name(pool: str) -> str:
    return f"engine-{pool}"


GATEWAY_DEPLOYMENT_NAME = "gateway"


@dataclass
class RequestRoute:
    """Everything the gateway decided about one request."""

    request_id: str
    kind: str  # "chat" | "completions"
    pool: str
    prompt_ids: list[int]
    max_tokens: int | None
    tenant: str
    session: PreparedTurn | None = None
    spilled_from: str | None = None
    # The reply (choice 0) as it goes by, for the tokens the engine will hold.
    reply: ReplyAccumulator = field(default_factory=ReplyAccumulator)
    closed: bool = False


def _sse_chunks(item: Any) -> Iterator[dict[str, Any]]:
    """The JSON chunks in one item of the ingress's SSE stream (a string or a list of them)."""
    for packet in item if isinstance(item, list) else [item]:
        if not isinstance(packet, str):
            continue
        for line in packet.splitlines():
            payload = line[len("data: ") :].strip() if line.startswith("data: ") else ""
            if payload and payload != "[DONE]":
                try:
                    yield json.loads(payload)
                except ValueError:
                    continue


def _error_response(err: errors.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal as an OpenAI error body (FastAPI's default is `{"detail": ...}`)."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.APIError)
        return _error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = exc.errors()
        first = details[0] if details else {}
        if first.get("type") == "json_invalid":
            return _error_response(errors.invalid_json(str(first.get("ctx", {}).get("error", "malformed JSON"))))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request"))
        if param:
            message = f"{message} (at `{param}`)"
        return _error_response(errors.bad_request(f"Invalid request: {message}", param=param, code="invalid_parameter"))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(errors.APIError(exc.status_code, str(exc.detail), type=kind))

    async def on_openai(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(errors.APIError(exc.status_code, exc.message, type=kind, code=str(exc.type)))

    app.add_exception_handler(errors.APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(OpenAIHTTPException, on_openai)


class Gateway(OpenAiIngress):
    def __init__(self, cluster_config: dict[str, Any], pools: dict[str, DeploymentHandle]) -> None:
        self.cfg = ClusterConfig.model_validate(cluster_config)
        missing = {p.name for p in self.cfg.pools} - set(pools)
        if missing:
            raise ValueError(f"gateway got no handle for pools {sorted(missing)}")
        self.served_name = self.cfg.model.served_name
        cards = {name: self._card() for name in pools}
        super().__init__(llm_deployments=pools, model_cards=cards)
        self._pool_handles = {name: h.options(stream=True) for name, h in pools.items()}
        self.selector = PoolSelector(self.cfg.pools)
        self.tokenizer = PromptTokenizer()
        configure_tracing(self.cfg.telemetry)
        self.auth = TenantAuthenticator.from_config(self.cfg.auth)
        # Connects lazily: the gateway starts (and serves stateless requests) without Redis.
        self.sessions = SessionFlow.from_config(self.cfg)
        self._in_flight: dict[str, int] = {p.name: 0 for p in self.cfg.pools}
        # The block size each pool's router indexes with (deployments.app.request_router_config).
        self._hash_block_size = {
            p.name: self.cfg.router.index_block_size or p.engine.block_size for p in self.cfg.pools
        }
        # Live replica counts, refreshed from the controller; config until the first poll.
        self._replicas: dict[str, int] = {p.name: p.start_replicas for p in self.cfg.pools}
        self._gateways = 1
        self._ready = False
        self._ready_detail = "waiting for the first status poll"
        self._background: set[asyncio.Task[Any]] = set()
        self._status_task: asyncio.Task[None] | None = None

    def _card(self) -> ModelCard:
        return ModelCard(
            id=self.served_name,
            object="model",
            owned_by="mistralai",
            permission=[],
            metadata={"max_context": self.cfg.max_context, "pools": {p.name: p.max_model_len for p in self.cfg.pools}},
        )

    # ---- health -----------------------------------------------------------------

    async def check_health(self) -> None:
        self._ensure_status_task()

    def _ensure_status_task(self) -> None:
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.get_running_loop().create_task(self._poll_status())

    async def _poll_status(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._refresh_status)
            except Exception as exc:  # the controller may be restarting; keep serving
                self._ready_detail = f"status poll failed: {exc}"
            await asyncio.sleep(STATUS_REFRESH_S)

    def _refresh_status(self) -> None:
        status = serve.status()
        app_name = serve.get_replica_context().app_name
        app = status.applications.get(app_name)
        if app is None:
            self._ready, self._ready_detail = False, f"application {app_name!r} not found"
            return
        not_ready = []
        for pool in self.cfg.pools:
            dep = app.deployments.get(engine_deployment_name(pool.name))
            running = int(dep.replica_states.get("RUNNING", 0)) if dep else 0  # type: ignore[call-overload]
            self._replicas[pool.name] = running
            if running == 0 and pool.min_replicas > 0:
                not_ready.append(f"{pool.name}: 0 running replicas")
        gw = app.deployments.get(GATEWAY_DEPLOYMENT_NAME)
        self._gateways = max(1, int(gw.replica_states.get("RUNNING", 0)) if gw else 1)  # type: ignore[call-overload]
        self._ready = not not_ready
        self._ready_detail = "; ".join(not_ready) or "all pools have running replicas"

    async def healthz(self) -> Response:
        """Liveness: this gateway's event loop answers."""
        return JSONResponse({"status": "ok"})

    async def readyz(self) -> Response:
        """Readiness: every pool with min_replicas > 0 has a running engine replica."""
        self._ensure_status_task()
        body = {
            "ready": self._ready,
            "detail": self._ready_detail,
            "replicas": dict(self._replicas),
            "in_flight": dict(self._in_flight),
        }
        return JSONResponse(body, status_code=200 if self._ready else 503)

    # ---- models -----------------------------------------------------------------

    async def models(self) -> ModelList:
        return ModelList(data=[self._card()])

    async def model_data(self, model: str) -> ModelCard:
        if model != self.served_name:
            raise errors.model_not_found(model, self.served_name)
        return self._card()

    # ---- request steps ------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_name:
            raise errors.model_not_found(model, self.served_name)

    async def authenticate(self, request: Request) -> str:
        """The tenant of the request (401 otherwise). Auth off: the configured default tenant."""
        return self.auth.authenticate(request.headers.get("authorization"))

    def loads(self) -> dict[str, PoolLoad]:
        # Each gateway replica sees about 1/N of the traffic; scale its own count.
        return {
            name: PoolLoad(in_flight=n * self._gateways, replicas=self._replicas.get(name, 0))
            for name, n in self._in_flight.items()
        }

    def choose_pool(self, prompt_tokens: int, max_tokens: int | None) -> tuple[str, str | None]:
        try:
            choice = self.selector.select(prompt_tokens, max_tokens, self.loads())
        except ContextTooLong as exc:
            raise errors.context_length_exceeded(exc.prompt_tokens, exc.max_tokens, exc.limit) from None
        return choice.pool, choice.spilled_from

    # ---- endpoints --------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        with _tracer.start_as_current_span("gateway.chat") as span:
            self.check_model(body.model)
            tenant = await self.authenticate(request)
            session_id = session_id_from_request(request.headers, body)
            session: PreparedTurn | None = None
            if session_id:
                # History first, so tokens, pool and prefix hashes cover the whole conversation.
                session = await self.sessions.prepare(tenant, session_id, body.messages)
                body.messages = session.messages  # type: ignore[assignment]
                span.set_attribute("session.id", session_id)
            body = _sanitize_chat_completion_request(body)
            try:
                prompt_ids = await asyncio.to_thread(self.tokenizer.chat_prompt_ids, body)
            except (ValueError, TypeError) as exc:
                raise errors.bad_request(f"Invalid conversation: {exc}", param="messages") from None
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            span.set_attribute("prompt_tokens", len(prompt_ids))
            response = await self._dispatch(request, body, "chat", prompt_ids, max_tokens, tenant, session)
            span.set_attribute("pool", response.headers.get("X-Pool", ""))
            span.set_attribute("replica", response.headers.get("X-Served-By", ""))
            if session is not None:
                response = await self._commit_session(session, response, request.state.route.reply)
            return response

    async def _commit_session(self, session: PreparedTurn, response: Response, reply: ReplyAccumulator) -> Response:
        """Store the turn: a streamed reply when its stream completes, a whole one now."""
        replica = response.headers.get("X-Served-By")
        if isinstance(response, StreamingResponse):
            upstream: Any = response.body_iterator  # the ingress's SSE strings
            response.body_iterator = self.sessions.stream_and_commit(session, upstream, replica_id=replica)
            return response
        if response.status_code != 200:
            return response
        # A 409 (another turn of this session won the race) or 503 (Redis down): the reply
        # is not stored, so it is not returned either; the client retries the turn.
        await self.sessions.commit(session, reply.message(), replica_id=replica, reply_tokens=reply.completion_tokens)
        return response

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        tenant = await self.authenticate(request)
        if session_id_from_request(request.headers, None):
            raise errors.bad_request(
                "sessions apply to /v1/chat/completions only; drop the X-Session-ID header for /v1/completions",
                param="session_id",
            )
        raw: Any = body.prompt
        prompts: list[Any] = raw if isinstance(raw, list) else [raw]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt given as token ids
        if any(p is None for p in prompts):
            raise errors.bad_request("`prompt` is required", param="prompt")
        if not prompts:
            raise errors.bad_request("`prompt` must not be empty", param="prompt")
        try:
            all_ids = [await asyncio.to_thread(self.tokenizer.completion_prompt_ids, p) for p in prompts]
        except (ValueError, TypeError) as exc:
            raise errors.bad_request(f"Invalid prompt: {exc}", param="prompt") from None
        # A batch goes where its longest prompt fits; the hint carries the first prompt
        # (choice 0 continues it).
        longest = max(len(ids) for ids in all_ids)
        with _tracer.start_as_current_span("gateway.completions") as span:
            span.set_attribute("prompt_tokens", longest)
            return await self._dispatch(
                request, body, "completions", all_ids[0], body.max_tokens, tenant, None, select_tokens=longest
            )

    async def _dispatch(
        self,
        request: Request,
        body: Any,
        kind: str,
        prompt_ids: list[int],
        max_tokens: int | None,
        tenant: str,
        session: PreparedTurn | None,
        *,
        select_tokens: int | None = None,
    ) -> Response:
        self._ensure_status_task()
        pool, spilled_from = self.choose_pool(select_tokens or len(prompt_ids), max_tokens)
        request_id = self._request_id()
        body.request_id = request_id
        body.model = self.served_name
        route = RequestRoute(
            request_id=request_id,
            kind=kind,
            pool=pool,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            tenant=tenant,
            session=session,
            spilled_from=spilled_from,
        )
        # The router's prefix index works on chained block hashes; hash here, off the
        # event loop, so the router (on its own loop) does not have to.
        block_size = self._hash_block_size[pool]
        hashes = await asyncio.to_thread(chain_block_hashes, prompt_ids, block_size)
        hint = RoutingHint(
            prompt_token_ids=prompt_ids,
            max_tokens=max_tokens or 0,
            session_id=session.session_id if session else None,
            affinity_replica=session.affinity_replica if session else None,
            tenant=tenant,
            pool=pool,
            block_hashes=hashes,
            hash_block_size=block_size,
        )
        HINTS.post(request_id, hint)
        request.state.route = route
        self._in_flight[pool] += 1
        try:
            response = await self._process_llm_request(body, call_method=kind, raw_request=request)
        except BaseException:
            self._close(route, body, ok=False)
            raise
        response.headers["X-Pool"] = pool
        response.headers["X-Prompt-Tokens"] = str(len(prompt_ids))
        if hint.chosen_replica:
            response.headers["X-Served-By"] = hint.chosen_replica
        if not route.closed and not getattr(response, "body_iterator", None):
            self._close(route, body, ok=True)
        return response

    @staticmethod
    def _request_id() -> str:
        ctx = serve.context._get_serve_request_context()
        return getattr(ctx, "_internal_request_id", "") or uuid.uuid4().hex

    async def _get_response(  # type: ignore[override]
        self, *, body: Any, call_method: str, raw_request: Request | None = None
    ) -> AsyncGenerator[Any, None]:
        """Call the chosen pool's engine handle; watch the reply go by."""
        assert raw_request is not None
        route: RequestRoute = raw_request.state.route
        handle = self._pool_handles[route.pool]
        if route.session is not None:
            handle = handle.options(session_id=route.session.session_id)
        raw_info = RawRequestInfo.from_starlette_request(raw_request)
        ok = False
        try:
            async for item in getattr(handle, call_method).remote(body, raw_info):
                first = item[0] if isinstance(item, list) and item else item
                if isinstance(first, NON_STREAMING_RESPONSE_TYPES):
                    route.reply.add_whole(first.model_dump())
                    self._close(route, body, ok=True)
                elif not _is_error(first):
                    for chunk in _sse_chunks(item):
                        route.reply.add(chunk)
                yield item
            ok = True
        finally:
            # Stream finished, failed or the client went away: the engine has cached
            # what it processed either way.
            self._close(route, body, ok=ok or route.reply.chunks > 0)

    # ---- session resources ------------------------------------------------------------------

    async def create_session(self, request: Request) -> Response:
        return await session_api.create_session(self.sessions, self.auth, request)

    async def read_session(self, session_id: str, request: Request) -> Response:
        return await session_api.read_session(self.sessions, self.auth, session_id, request)

    async def delete_session(self, session_id: str, request: Request) -> Response:
        return await session_api.delete_session(self.sessions, self.auth, session_id, request)

    # ---- completion bookkeeping ---------------------------------------------------------

    def _close(self, route: RequestRoute, body: Any, *, ok: bool) -> None:
        if route.closed:
            return
        route.closed = True
        self._in_flight[route.pool] = max(0, self._in_flight[route.pool] - 1)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed by garbage collection outside the loop
            ok = False
        if not ok:
            HINTS.pop(route.request_id)
            return
        task = loop.create_task(self._finish(route, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish(self, route: RequestRoute, body: Any) -> None:
        try:
            held = await asyncio.to_thread(self._held_ids, route, body)
            HINTS.finish(route.request_id, held)
        except Exception:
            logger.exception("finishing request %s failed", route.request_id)
            HINTS.pop(route.request_id)

    def _held_ids(self, route: RequestRoute, body: Any) -> list[int]:
        if route.kind == "chat":
            return self.tokenizer.chat_held_ids(body, route.prompt_ids, route.reply.content, route.reply.tool_calls)
        return self.tokenizer.completion_held_ids(route.prompt_ids, route.reply.content)


def _is_error(item: Any) -> bool:
    return type(item).__name__ == "ErrorResponse"


GATEWAY_ENDPOINTS = {
    "models": lambda app: app.get("/v1/models", response_model=ModelList),
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=ModelCard),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "create_session": lambda app: app.post("/v1/sessions", status_code=201),
    "read_session": lambda app: app.get("/v1/sessions/{session_id}"),
    "delete_session": lambda app: app.delete("/v1/sessions/{session_id}"),
    "healthz": lambda app: app.get("/healthz"),
    "readyz": lambda app: app.get("/readyz"),
}


def make_gateway_class(gateway_cls: type[Gateway] = Gateway) -> type:
    """The Serve ingress class: FastAPI routes bound to the gateway's methods."""
    app = init()
    install_error_handlers(app)
    return make_fastapi_ingress(gateway_cls, endpoint_map=GATEWAY_ENDPOINTS, app=app)
