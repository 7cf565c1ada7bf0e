"""Step: the tenant's prefix-cache salt (cluster.admission.cache_salt), set by the gateway
alone before the route step hashes the prompt, so the engine's prefix cache and the
router's prefix index are both partitioned by tenant (or by the tenant's cache group)."""

from __future__ import annotations

from cluster.admission.cache_salt import salt_for
from cluster.config import AdmissionConfig
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step


class Isolate(Step):
    name = "isolate"

    def __init__(self, cfg: AdmissionConfig) -> None:
        self.cfg = cfg

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.body.cache_salt = salt_for(self.cfg, ctx.tenant)
