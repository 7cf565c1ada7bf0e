"""Step 4: count the prompt's tokens once, exactly as the engine will (Mistral v7), off the
event loop. The one step where chat and completions differ."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster import errors
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step
from cluster.tokenizer import PromptTokenizer


class TokenizeChat(Step):
    name = "tokenize"

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer

    async def on_request(self, ctx: RequestContext) -> None:
        body = ctx.body
        try:
            ctx.prompt_ids = await asyncio.to_thread(self.tokenizer.chat_prompt_ids, body)
        except (ValueError, TypeError) as exc:
            raise errors.bad_request(f"Invalid conversation: {exc}", param="messages") from None
        ctx.select_tokens = len(ctx.prompt_ids)
        ctx.max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


class TokenizeCompletion(Step):
    name = "tokenize"

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer

    async def on_request(self, ctx: RequestContext) -> None:
        raw: Any = ctx.body.prompt
        prompts: list[Any] = raw if isinstance(raw, list) else [raw]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt given as token ids
        try:
            all_ids = await asyncio.to_thread(lambda: [self.tokenizer.completion_prompt_ids(p) for p in prompts])
        except (ValueError, TypeError) as exc:
            raise errors.bad_request(f"Invalid prompt: {exc}", param="prompt") from None
        # A batch goes where its longest prompt fits; routing follows the first prompt
        # (choice 0 continues it).
        ctx.prompt_ids = all_ids[0]
        ctx.select_tokens = max(len(ids) for ids in all_ids)
        ctx.max_tokens = ctx.body.max_tokens
