"""Ray 2.60's KVAwareRouter on our gateway (router.policy "ray-kv-aware").

Ray runs KVAwareRouter only behind its own LLMRouter ingress, which builds one
`KVTokenTracker` per process (a module global) before the handle's router starts. Our
gateway holds one handle per pool, so it builds a tracker per engine deployment
(`cluster.upstream.ray_serve.start_kv_token_tracker`) and this subclass binds the one of
its own deployment; every scoring decision is Ray's (`choose_replicas` is inherited).

The rest of Ray's wiring, unchanged: the engines publish KV events (Ray's builder sets
`kv_events_config` and PYTHONHASHSEED for a KV-aware deployment; each replica offsets its
ports by its node-local rank and advertises them in its routing stats), the gateway
passes the prompt's token ids as the handle call's `request_token_ids` keyword
(deployments.engine_client), and the engines send request lifecycle events to the
gateway deployment's `on_lifecycle_events` (deployments.gateway), which frees the
selection service's load reservations.
"""

from __future__ import annotations

import logging

from cluster.upstream import ray_serve as upstream_ray

logger = logging.getLogger("ray.serve")


class PoolKVAwareRouter(upstream_ray.kv_aware_router_base()):  # type: ignore[misc]
    """KVAwareRouter bound to the tracker of its own deployment."""

    def initialize_state(self, **_: object) -> None:
        self._kv_token_tracker = upstream_ray.kv_token_tracker(self._deployment_id)
        if self._kv_token_tracker is None:
            logger.warning(f"no KVTokenTracker for {self._deployment_id}: KVAwareRouter routes at random here")


__all__ = ["PoolKVAwareRouter"]
