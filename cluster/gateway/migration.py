"""Continue a stream whose replica failed after it had started: `StreamMigrator`.

The continuation is exact in tokens: the engine is asked for a completion of the prompt's
token ids plus the token ids already sent (vLLM returns each chunk's token ids when asked,
`return_token_ids`), with max_tokens (and min_tokens) reduced by what was sent and the
request's own sampling parameters. The new replica's prefix cache makes the re-prefill
cheap where it holds the prefix. Its text_completion chunks are re-shaped into the
original stream (same id, object and created; chat content as `delta.content`), so the
client sees one stream: no token twice or missing, one finish_reason, and usage counting
every token once (prompt tokens as the original request counted them).

What a client can rely on: greedy decoding (temperature 0) continues exactly as the failed
replica would have; with sampling the continuation is a fresh sample of the same
distribution (a given `seed` is reused, so a retried request stays reproducible, but not
identical to the cut one). A stream is not migrated, and ends with an error event and
`[DONE]` instead, when it cannot be continued exactly: several choices (`n` > 1), log
probabilities, a reply that has started a tool call (the tool-call parser runs on the
replica that began it), or when `resilience.max_migrations` is spent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cluster.gateway.context import EngineChunk, RequestContext

# OpenAI / vLLM sampling fields a continuation keeps (everything that shapes the tokens).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "seed",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)
TOKEN_FIELDS = ("token_ids", "prompt_token_ids")


class SentTokens:
    """What the client has received so far (choice 0), and the stream's identity."""

    def __init__(self, client_wants_ids: bool) -> None:
        self.client_wants_ids = client_wants_ids
        self.ids: list[int] = []
        self.template: dict[str, Any] | None = None  # id/object/created/model of the stream
        self.tool_call_started = False

    def observe(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Record a chunk's tokens; returns it as the client should see it."""
        if self.template is None and "choices" in chunk:
            self.template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            ids = choice.get("token_ids")
            if ids:
                self.ids.extend(int(t) for t in ids)
            if (choice.get("delta") or {}).get("tool_calls"):
                self.tool_call_started = True
        if self.client_wants_ids:
            return chunk
        return strip_token_ids(chunk)


def strip_token_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    if "prompt_token_ids" not in chunk and not any("token_ids" in c for c in chunk.get("choices") or []):
        return chunk
    out = {k: v for k, v in chunk.items() if k != "prompt_token_ids"}
    out["choices"] = [{k: v for k, v in c.items() if k not in TOKEN_FIELDS} for c in chunk.get("choices") or []]
    return out


class StreamMigrator:
    """Builds the continuation request of a cut stream and re-shapes its chunks."""

    def __init__(self, completion_model: type, max_migrations: int) -> None:
        self.completion_model: Any = completion_model
        self.max_migrations = max_migrations

    def why_not(self, ctx: RequestContext, sent: SentTokens) -> str | None:
        """None when the stream can be continued exactly; else the reason it cannot."""
        body = ctx.body
        if ctx.migrations >= self.max_migrations:
            return f"the stream was already migrated {ctx.migrations} time(s) (resilience.max_migrations)"
        prompt = getattr(body, "prompt", None)
        batch = isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)
        if (getattr(body, "n", 1) or 1) > 1 or batch:
            return "streams with several choices (n > 1, or several prompts) are not migrated"
        if getattr(body, "logprobs", None) or getattr(body, "top_logprobs", None):
            return "streams with log probabilities are not migrated"
        if sent.tool_call_started:
            return "a reply that has started a tool call is not migrated"
        if sent.template is None:
            return "the stream had not started"
        return None

    def continuation(self, ctx: RequestContext, sent: SentTokens, served_name: str, request_id: str) -> Any:
        body = ctx.body
        fields: dict[str, Any] = {
            "model": served_name,
            "prompt": [*ctx.prompt_ids, *sent.ids],
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "request_id": request_id,
            "echo": False,
        }
        # The tenant's prefix-cache salt (set by the gateway's isolate step) goes along.
        if getattr(body, "cache_salt", None):
            fields["cache_salt"] = body.cache_salt
        for name in SAMPLING_FIELDS:
            value = getattr(body, name, None)
            if value is not None:
                fields[name] = value
        done = len(sent.ids)
        if ctx.max_tokens is not None:
            fields["max_tokens"] = max(1, ctx.max_tokens - done)
        min_tokens = getattr(body, "min_tokens", 0) or 0
        if min_tokens:
            fields["min_tokens"] = max(0, min_tokens - done)
        if ctx.kind == "chat":
            # A chat turn ends at the end-of-sequence token; a completion must too.
            fields["skip_special_tokens"] = getattr(body, "skip_special_tokens", True)
        return self.completion_model.model_validate(fields)

    async def reshape(
        self, ctx: RequestContext, sent: SentTokens, stream: AsyncIterator[EngineChunk], sent_before: int
    ) -> AsyncIterator[EngineChunk]:
        """The continuation's chunks in the original stream's shape."""
        template = dict(sent.template or {})
        wants_usage = _wants_usage(ctx.body)
        async for item in stream:
            chunk = item.data
            if "error" in chunk:
                yield item
                continue
            usage = chunk.get("usage")
            choices = []
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or ""
                out: dict[str, Any] = {"index": 0, "finish_reason": choice.get("finish_reason")}
                if ctx.kind == "chat":
                    out["delta"] = {"content": text} if text else {}
                    out["logprobs"] = None
                else:
                    out["text"] = text
                if choice.get("token_ids") is not None:
                    out["token_ids"] = choice["token_ids"]
                if choice.get("stop_reason") is not None:
                    out["stop_reason"] = choice["stop_reason"]
                choices.append(out)
            if choices:
                yield EngineChunk({**template, "choices": choices})
            if usage and wants_usage:
                completion = sent_before + int(usage.get("completion_tokens") or 0)
                prompt = len(ctx.prompt_ids)
                fixed = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
                yield EngineChunk({**template, "choices": [], "usage": fixed})


def _wants_usage(body: Any) -> bool:
    options = getattr(body, "stream_options", None)
    return bool(getattr(options, "include_usage", False)) if options is not None else False


__all__ = ["SAMPLING_FIELDS", "SentTokens", "StreamMigrator", "strip_token_ids"]
