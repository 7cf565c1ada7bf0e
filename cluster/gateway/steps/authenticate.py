"""Step 1: the bearer key names the tenant (401 otherwise; auth off: the default tenant)."""

from __future__ import annotations

from cluster.auth import TenantAuthenticator
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step


class Authenticate(Step):
    name = "authenticate"

    def __init__(self, auth: TenantAuthenticator) -> None:
        self.auth = auth

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.tenant = self.auth.authenticate(ctx.header("authorization"))
