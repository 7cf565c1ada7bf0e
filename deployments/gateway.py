"""The Serve ingress: the gateway (cluster.gateway) on Ray Serve.

A plain `@serve.ingress` deployment whose FastAPI app is built per replica after the
constructor (`__serve_build_asgi_app__`): it owns dispatch, SSE and errors itself. This
module only wires Ray in: the engine pools' handles (deployments.engine_client), the
controller's replica counts for readiness and spill decisions, and Serve's health check.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.config import RAY_KV_AWARE_POLICY, ClusterConfig
from cluster.gateway import build_gateway
from cluster.gateway.app import build_gateway_app
from cluster.telemetry import configure_tracing
from cluster.upstream import ray_serve as upstream_ray
from deployments.engine_client import ServeEngineClient

logger = logging.getLogger("ray.serve")  # lands in the replica's Serve log

GATEWAY_DEPLOYMENT_NAME = "gateway"
STATUS_REFRESH_S = 5.0


def engine_deployment_name(pool: str) -> str:
    return f"engine-{pool}"


@serve.ingress()
class GatewayDeployment:
    async def __init__(self, cluster_config: dict[str, Any], pools: dict[str, DeploymentHandle]) -> None:  # type: ignore[misc]
        cfg = ClusterConfig.model_validate(cluster_config)
        missing = {p.name for p in cfg.pools} - set(pools)
        if missing:
            raise ValueError(f"gateway got no handle for pools {sorted(missing)}")
        configure_tracing(cfg.telemetry)
        kv_aware = self._start_kv_token_trackers(cfg, pools)
        engines = ServeEngineClient(pools, token_id_pools=kv_aware)
        self.gateway = build_gateway(cfg, engines, request_models=(ChatCompletionRequest, CompletionRequest))
        self._serve_metrics_port(cfg.telemetry.metrics.port)
        self._status_task: asyncio.Task[None] | None = None
        await self.check_health()

    def _start_kv_token_trackers(self, cfg: ClusterConfig, pools: dict[str, DeploymentHandle]) -> list[str]:
        """Ray's KVAwareRouter (policy ray-kv-aware) scores through a KVTokenTracker in the
        process that routes: one per pool here, before the pool's router starts (its first
        request). Returns the pools that take prompt token ids."""
        if cfg.router.policy != RAY_KV_AWARE_POLICY:
            return []
        threads = 1 if cfg.node.accelerator == "cpu" else 4
        me = serve.get_deployment_handle(GATEWAY_DEPLOYMENT_NAME, app_name=serve.get_replica_context().app_name)
        for handle in pools.values():
            tracker = upstream_ray.start_kv_token_tracker(handle.deployment_id, threads)
            tracker.start_reservation_broadcast(me)  # to the other gateway replicas
        return list(pools)

    # Ray's KV-aware engines and peer gateways call these (KVTokenTracker's intake): each
    # tracker ignores the requests it does not track, so every tracker hears every batch.
    async def on_lifecycle_events(self, batch: list[Any]) -> None:
        for tracker in upstream_ray.kv_token_trackers():
            await tracker.on_lifecycle_events(batch)

    async def on_reservations_created(self, batch: list[Any]) -> None:
        for tracker in upstream_ray.kv_token_trackers():
            await tracker.on_reservations_created(batch)

    def _serve_metrics_port(self, port: int | None) -> None:
        """The chart scrapes each gateway replica here (one per pod): a scrape of the API
        port goes through Serve's proxy to any one replica."""
        if port is None:
            return
        if not self.gateway.metrics.serve_on_port(port):  # a second gateway replica on this node
            logger.warning(f"gateway metrics port {port} is taken; this replica's metrics: API port only")

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve's proxy returns X-Request-Id itself (the id it gave this request).
        return build_gateway_app(self.gateway, echo_request_id=False)

    async def check_health(self) -> None:
        # Serve calls this periodically on the replica's loop: keep the status poll alive.
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.get_running_loop().create_task(self._poll_status())

    async def _poll_status(self) -> None:
        while True:
            try:
                running, gateways = await asyncio.to_thread(self._read_status)
                self.gateway.fleet.update(running, gateways)
            except Exception as exc:  # the controller may be restarting; keep serving
                self.gateway.fleet.failed(str(exc))
            await asyncio.sleep(STATUS_REFRESH_S)

    def _read_status(self) -> tuple[dict[str, int], int]:
        status = serve.status()
        app = status.applications.get(serve.get_replica_context().app_name)
        if app is None:
            return {}, 1

        def running(name: str) -> int:
            dep = app.deployments.get(name)
            return int(dep.replica_states.get("RUNNING", 0)) if dep else 0  # type: ignore[call-overload]

        pools = {p.name: running(engine_deployment_name(p.name)) for p in self.gateway.cfg.pools}
        return pools, running(GATEWAY_DEPLOYMENT_NAME)
