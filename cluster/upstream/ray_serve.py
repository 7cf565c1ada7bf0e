"""The Ray (2.60) internals we still rely on, and why there is no public way yet.

Public APIs are used directly elsewhere: `ray.serve.llm` (LLMConfig, LLMServer,
build_llm_deployment, openai_api_models), `ray.serve.request_router`, `serve.run`,
`serve.status`, `@serve.ingress` with `__serve_build_asgi_app__`.
"""

from __future__ import annotations

from typing import Any

from cluster.upstream import check_version

RAY_VERSION = "2.60."


def ray_version() -> str:
    return check_version("ray", RAY_VERSION)


def node_log_dir() -> str:
    """This Ray session's log directory (no public accessor)."""
    from ray._private import worker

    return str(worker._global_node.get_logs_dir_path())  # type: ignore[attr-defined,union-attr]


def deploy_without_waiting(app: Any, *, name: str, route_prefix: str = "/") -> None:
    """Deploy `app` and return at once (`serve.run` waits until every replica is up; the
    local runner prints progress while engines load instead)."""
    from ray.serve.api import _run

    _run(app, _blocking=False, name=name, route_prefix=route_prefix)


def raw_request_info(headers: dict[str, str]) -> Any:
    """The `raw_request_info` argument of LLMServer.chat/completions: the HTTP headers
    vLLM's OpenAI layer sees (it reads W3C `traceparent` there when tracing is on). Ray
    2.60 exports the class only from ray.llm._internal (serve/core/protocol.py)."""
    from ray.llm._internal.serve.core.protocol import RawRequestInfo

    return RawRequestInfo(headers=dict(headers))


def async_llm_of(server: Any) -> Any:
    """vLLM's AsyncLLM inside a ray.serve.llm LLMServer (VLLMEngine keeps it in
    `_engine_client`); None before the engine started."""
    return getattr(getattr(server, "engine", None), "_engine_client", None)
