"""Step 8 (last): tell the pool's router what the chosen replica now caches.

The engine keeps the prompt and the reply's tokens in its prefix cache, so the next turn
of the conversation should find them there. Off the event loop this step encodes the held
conversation (prompt + reply, as the next turn's prompt starts) and extends the prompt's
block-hash chain with the reply's new blocks only; the router then just records it.
A request the engine never processed (refused, failed before its first chunk) reports
nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.routing.block_hash import extend_chain, salt_root
from cluster.routing.hints import HintBoard
from cluster.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


class Finish(Step):
    name = "finish"

    def __init__(self, board: HintBoard, tokenizer: PromptTokenizer) -> None:
        self.board = board
        self.tokenizer = tokenizer
        self._background: set[asyncio.Task[Any]] = set()

    def on_finish(self, ctx: RequestContext) -> None:
        hint = ctx.hint
        if hint is None or hint.chosen_replica is None or ctx.reply.chunks == 0:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._report(ctx))
        except RuntimeError:  # no loop (closed at interpreter exit): nothing to report to
            self.board.pop(ctx.engine_request_id)
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _report(self, ctx: RequestContext) -> None:
        try:
            held_hashes, held_tokens = await asyncio.to_thread(self.held_blocks, ctx)
            self.board.finish(ctx.engine_request_id, held_hashes, held_tokens)
        except Exception:
            log.exception("reporting what request %s left cached failed", ctx.request_id)
            self.board.pop(ctx.engine_request_id)

    def held_blocks(self, ctx: RequestContext) -> tuple[list[int], int]:
        """Block hashes of the held conversation and its length in tokens."""
        assert ctx.hint is not None
        if ctx.kind == "chat":
            held = self.tokenizer.chat_held_ids(ctx.body, ctx.prompt_ids, ctx.reply.content, ctx.reply.tool_calls)
        else:
            held = self.tokenizer.completion_held_ids(ctx.prompt_ids, ctx.reply.content)
        prompt_hashes = list(ctx.hint.block_hashes or [])
        # Reuse the prompt's chain where the held tokens still start with the prompt.
        block = ctx.hint.hash_block_size
        same = len(prompt_hashes) * block
        if held[:same] != ctx.prompt_ids[:same]:
            prompt_hashes = []
        root = salt_root(getattr(ctx.body, "cache_salt", None))
        return extend_chain(prompt_hashes, held, block, root), len(held)
