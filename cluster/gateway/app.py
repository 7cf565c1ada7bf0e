"""The gateway's HTTP surface: a plain FastAPI app over a `Gateway` (cluster.gateway).

Every endpoint is thin: a chat or completion request becomes a `RequestContext` and runs
through its pipeline; everything else is a read of the gateway's state. Every refusal has
an OpenAI error body. Request models are parameters (Ray Serve LLM's public models in the
deployment, vLLM's in unit tests), so this module needs no Ray.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations, and
# the request model classes are local to build_gateway_app.

import importlib.metadata
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from cluster import errors
from cluster.admission.limiter import UNREACHABLE, utc_day
from cluster.gateway import Gateway, public_api
from cluster.gateway.context import RequestContext
from cluster.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cluster.sessions import api as session_api
from cluster.upstream import vllm as upstream_vllm

log = logging.getLogger(__name__)

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
USAGE_FIELDS = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}

REQUEST_ID_HEADER = "X-Request-Id"


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
        return _error_response(public_api.validation_error(details))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(errors.APIError(exc.status_code, str(exc.detail), type=kind))

    async def on_engine_validation(request: Request, exc: Exception) -> Response:
        # vLLM's request models check some fields themselves (e.g. stream_options without
        # stream): a 400 naming the field, like any other invalid parameter.
        param = getattr(exc, "parameter", None)
        message = str(exc.args[0]) if exc.args else str(exc)
        return _error_response(errors.bad_request(f"Invalid request: {message}", param=param, code="invalid_parameter"))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error_response(errors.APIError(500, "internal error; the request was not processed", code="internal"))

    app.add_exception_handler(errors.APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(upstream_vllm.client_error_type(), on_engine_validation)
    app.add_exception_handler(Exception, on_unexpected)


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    # A client's id is kept when it is a plain token (it ends up in logs and engine ids).
    if 8 <= len(given) <= 64 and all(c.isalnum() or c in "-_" for c in given):
        return given
    return uuid.uuid4().hex


PROJECT = "mistral-large-serve"


def _version() -> str:
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _publish_request_schemas(app: FastAPI, chat_model: type, completion_model: type) -> None:
    """/openapi.json describes the public request bodies (the handlers parse them)."""
    extra = {
        **public_api.public_schemas("chat", chat_model),
        **public_api.public_schemas("completions", completion_model),
        "CreateSessionRequest": public_api.CREATE_SESSION_SCHEMA,
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(extra)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_gateway_app(gateway: Gateway, *, echo_request_id: bool = True) -> FastAPI:
    """The gateway's HTTP API. `echo_request_id=False` where a proxy in front already
    returns X-Request-Id (Serve's does, with the id it passed in), so it is sent once."""
    cfg = gateway.cfg
    chat_model, completion_model = gateway.chat_model, gateway.completion_model
    app = FastAPI(
        title=PROJECT,
        version=_version(),
        description=f"OpenAI-compatible API for {cfg.model.served_name}",
    )
    install_error_handlers(app)
    _publish_request_schemas(app, chat_model, completion_model)

    def card() -> dict[str, Any]:
        return {
            "id": cfg.model.served_name,
            "object": "model",
            "owned_by": "mistralai",
            "permission": [],
            "metadata": {"max_context": cfg.max_context, "pools": {p.name: p.max_model_len for p in cfg.pools}},
        }

    async def run(kind: Any, pipeline: Any, body: Any, request: Request) -> Response:
        ctx = RequestContext(kind=kind, body=body, headers=request.headers, request_id=_request_id(request))
        if echo_request_id:
            ctx.response_headers[REQUEST_ID_HEADER] = ctx.request_id
        try:
            return await pipeline.run(ctx)
        except errors.APIError as exc:
            response = _error_response(exc)
            # What steps learnt before the refusal (rate-limit headers, pool) goes too.
            for name, value in ctx.response_headers.items():
                if name not in response.headers:
                    response.headers[name] = value
            return response

    @app.post("/v1/chat/completions", openapi_extra=public_api.body_spec("ChatCompletionRequest"))
    async def chat(request: Request) -> Response:
        body = public_api.parse_request("chat", await request.body(), chat_model)
        return await run("chat", gateway.chat, body, request)

    @app.post("/v1/completions", openapi_extra=public_api.body_spec("CompletionRequest"))
    async def completions(request: Request) -> Response:
        body = public_api.parse_request("completions", await request.body(), completion_model)
        return await run("completions", gateway.completions, body, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model_data(model: str) -> dict[str, Any]:
        if model != cfg.model.served_name:
            raise errors.model_not_found(model, cfg.model.served_name)
        return card()

    @app.post("/v1/sessions", status_code=201, openapi_extra=public_api.body_spec("CreateSessionRequest"))
    async def create_session(request: Request) -> Response:
        return await session_api.create_session(gateway.sessions, gateway.auth, request)

    @app.get("/v1/sessions/{session_id}")
    async def read_session(session_id: str, request: Request) -> Response:
        return await session_api.read_session(gateway.sessions, gateway.auth, session_id, request)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request) -> Response:
        return await session_api.delete_session(gateway.sessions, gateway.auth, session_id, request)

    metrics_path = cfg.telemetry.metrics.path
    if metrics_path:

        @app.get(metrics_path, include_in_schema=False)
        async def metrics() -> Response:
            """This gateway replica's Prometheus metrics (cluster.gateway.metrics)."""
            return Response(gateway.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/usage")
    async def usage(request: Request, day: str | None = None) -> Response:
        """The caller's own usage of one UTC day (YYYY-MM-DD, today by default), for chargeback."""
        tenant = gateway.auth.authenticate(request.headers.get("authorization"))
        if day is not None and not _DAY.fullmatch(day):
            raise errors.bad_request("day must be YYYY-MM-DD", param="day")
        if gateway.limiter is None:
            raise errors.service_unavailable("usage accounting is off")
        chosen = day or utc_day()
        try:
            counted = await gateway.limiter.usage(tenant, chosen)
        except UNREACHABLE:
            raise errors.service_unavailable("the usage store (Redis) is unreachable; retry later") from None
        return JSONResponse({"object": "usage", "tenant": tenant, "day": chosen, **USAGE_FIELDS, **counted})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: this gateway's event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: every pool with min_replicas > 0 has a running engine replica
        (independent of Redis: stateless requests are served without it)."""
        fleet = gateway.fleet
        body = {
            "ready": fleet.ready,
            "detail": fleet.detail,
            "replicas": dict(fleet.replicas),
            "in_flight": dict(gateway.pools.in_flight),
        }
        return JSONResponse(body, status_code=200 if fleet.ready else 503)

    return app


__all__ = ["REQUEST_ID_HEADER", "build_gateway_app", "install_error_handlers"]
