"""Step 6: hand the pool's router what it needs to choose a replica.

Ray Serve runs each pool's RequestRouter inside this gateway process (it belongs to the
handle), so the gateway posts a `RoutingHint` under the request id on the process's hint
board: the token ids counted once, their chained block hashes (hashed here, off the event
loop, at the block size the pool's router indexes with) and the session's last replica.
The router writes its choice back into the hint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.routing.block_hash import chain_block_hashes, salt_root
from cluster.routing.hints import HintBoard, RoutingHint


class Route(Step):
    name = "route"

    def __init__(self, board: HintBoard, block_sizes: Mapping[str, int]) -> None:
        self.board = board
        self.block_sizes = dict(block_sizes)

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.pool is not None, "route runs after choose_pool"
        await self.post(ctx, ctx.pool, ctx.request_id, ctx.prompt_ids)

    async def post(self, ctx: RequestContext, pool: str, engine_request_id: str, token_ids: list[int]) -> None:
        """(Re)post the request's hint for `pool` under `engine_request_id`, keeping the
        replicas it already failed on; the previous hint is withdrawn."""
        block_size = self.block_sizes[pool]
        root = salt_root(getattr(ctx.body, "cache_salt", None))  # the tenant's own chain
        hashes = await asyncio.to_thread(chain_block_hashes, token_ids, block_size, root)
        excluded = set(ctx.hint.excluded_replicas) if ctx.hint is not None else set()
        if ctx.engine_request_id:
            self.board.pop(ctx.engine_request_id)
        ctx.hint = RoutingHint(
            prompt_token_ids=token_ids,
            pool=pool,
            max_tokens=ctx.max_tokens or 0,
            session_id=ctx.session_id,
            affinity_replica=ctx.session.affinity_replica if ctx.session else None,
            block_hashes=hashes,
            hash_block_size=block_size,
            excluded_replicas=excluded,
        )
        ctx.engine_request_id = engine_request_id
        self.board.post(engine_request_id, ctx.hint)

    def on_finish(self, ctx: RequestContext) -> None:
        # The finish step reports (and removes) hints of requests the engine processed.
        if ctx.hint is not None and ctx.reply.chunks == 0:
            self.board.pop(ctx.engine_request_id)
