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


def deployment_configs(app: Any) -> dict[str, Any]:
    """Deployment name -> Serve DeploymentConfig of every deployment an Application built
    by deployments.app binds (the ingress and the applications passed as its arguments);
    Ray has no public accessor for the options a deployment was given."""
    out: dict[str, Any] = {}
    pending = [app]
    while pending:
        bound = pending.pop()._bound_deployment
        out[bound.name] = bound._deployment_config
        args = [*bound.init_args, *bound.init_kwargs.values()]
        for arg in args:
            values = arg.values() if isinstance(arg, dict) else [arg]
            pending += [v for v in values if hasattr(v, "_bound_deployment")]
    return out


def replica_details(app: str, deployment: str) -> list[dict[str, Any]]:
    """Each replica of a deployment as Serve's controller knows it (`replica_id`, `state`,
    `pid`, ...: ray.serve.schema.ReplicaDetails); `serve.status()` gives counts only, the
    per-replica view is what the dashboard's REST API serves, from the private client."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # it raises when no controller runs
    details = client.get_serve_details()
    dep = details.get("applications", {}).get(app, {}).get("deployments", {}).get(deployment, {})
    return list(dep.get("replicas", []))
