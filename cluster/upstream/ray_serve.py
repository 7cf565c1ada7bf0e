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


# --- Ray Serve LLM's own request routers (router.policy ray-prefix-aware / ray-kv-aware) ---
# Ray 2.60 ships both only under ray.llm._internal; the import paths live here alone.

PREFIX_AWARE_ROUTER_CLASS = (
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
)
# The routing-stats key under which a KV-aware replica advertises its KV-events endpoint
# (ray.llm._internal.serve.routing_policies.kv_aware.vllm.kv_events).
KV_EVENT_METADATA_KEY = "kv_event_metadata"
# The handle-call keyword argument carrying prompt token ids to KVAwareRouter
# (routing_policies.kv_aware.constants.REQUEST_TOKEN_IDS_KWARG).
REQUEST_TOKEN_IDS_KWARG = "request_token_ids"

_kv_trackers: dict[str, Any] = {}  # str(deployment id) -> KVTokenTracker, in this process


def kv_aware_router_base() -> type:
    """Ray 2.60's KVAwareRouter (it scores with Dynamo's SelectionService)."""
    from ray.llm._internal.serve.routing_policies.kv_aware.kv_aware_router import KVAwareRouter

    return KVAwareRouter


def kv_aware_experimental_configs(events_port_base: int, token_port_base: int, indexer_threads: int) -> dict[str, int]:
    """LLMConfig.experimental_configs of a KV-aware pool: the base ports its replicas offset
    by their node-local rank (per pool, so pools on one node do not clash) and the
    selection service's indexer threads."""
    from ray.llm._internal.serve.routing_policies.kv_aware import constants

    return {
        constants.KV_EVENTS_PORT_BASE_KEY: events_port_base,
        constants.KV_TOKEN_PORT_BASE_KEY: token_port_base,
        constants.KV_INDEXER_THREADS_KEY: indexer_threads,
    }


def start_kv_token_tracker(deployment_id: Any, indexer_threads: int) -> Any:
    """A KVTokenTracker (Dynamo SelectionService + replica tracking over LongPoll) for
    one engine deployment, built in the process whose handles route to it (Ray builds it
    inside its LLMRouter ingress; ours is the gateway). Call from a running event loop."""
    from ray.llm._internal.serve.routing_policies.kv_aware.kv_token_tracker import KVTokenTracker

    tracker = KVTokenTracker(indexer_threads=indexer_threads, serve_deployment_id=deployment_id)
    _kv_trackers[str(deployment_id)] = tracker
    return tracker


def kv_token_tracker(deployment_id: Any) -> Any:
    """The tracker this process built for `deployment_id` (None: none)."""
    return _kv_trackers.get(str(deployment_id))


def kv_token_trackers() -> list[Any]:
    return list(_kv_trackers.values())


def send_kv_lifecycle_events_to(deployment_name: str) -> None:
    """In a KV-aware engine replica: deliver request lifecycle events (prefill done,
    finished), which free the selection service's load reservations, to
    `deployment_name`'s `on_lifecycle_events` instead of Ray's "LLMRouter" ingress.
    Ray resolves the name from this module global at each first use."""
    from ray.llm._internal.serve.routing_policies.kv_aware import kv_token_tracker

    kv_token_tracker.LLM_ROUTER_DEPLOYMENT_NAME = deployment_name  # type: ignore[misc]


def replica_local_rank() -> int:
    """This Serve replica's rank among its deployment's replicas on this node (what Ray's
    KV-aware engines offset their ports by); 0 outside a replica."""
    from ray import serve

    try:
        rank = serve.get_replica_context().rank
    except Exception:  # not in a replica (tests, scripts)
        return 0
    return int(getattr(rank, "local_rank", 0) or 0)
