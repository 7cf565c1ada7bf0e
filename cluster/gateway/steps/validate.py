"""Step 2: the request is one this server can answer: the public model name, a non-empty
conversation or prompt, and a body Ray can ship to an engine replica."""

from __future__ import annotations

from typing import Any

from cluster import errors
from cluster.gateway.context import RequestContext
from cluster.gateway.pipeline import Step


class Validate(Step):
    name = "validate"

    def __init__(self, served_name: str) -> None:
        self.served_name = served_name

    async def on_request(self, ctx: RequestContext) -> None:
        model = getattr(ctx.body, "model", None)
        if model is not None and model != self.served_name:
            raise errors.model_not_found(model, self.served_name)
        if ctx.kind == "chat":
            materialize_messages(ctx.body)
        else:
            check_prompt(ctx.body)


def materialize_messages(body: Any) -> None:
    """Pydantic keeps `Iterable[...]` message fields (`content` parts, `tool_calls`) as
    one-shot validator iterators, which neither pickle (the engine call) nor survive a
    second read (tokenizer, then engine): turn them into lists once."""
    messages = getattr(body, "messages", None)
    if not messages:
        raise errors.bad_request("`messages` must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            messages[i] = message = message.model_dump()
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            try:
                message["content"] = list(content)
            except (TypeError, ValueError):
                raise errors.bad_request(
                    "message content must be a string, null or a list of content parts", param=f"messages.{i}.content"
                ) from None
        if message.get("role") == "assistant" and message.get("tool_calls") is not None:
            try:
                message["tool_calls"] = list(message["tool_calls"])
            except (TypeError, ValueError):
                raise errors.bad_request("tool_calls must be a list", param=f"messages.{i}.tool_calls") from None


def check_prompt(body: Any) -> None:
    raw: Any = getattr(body, "prompt", None)
    if raw is None:
        raise errors.bad_request("`prompt` is required", param="prompt")
    if isinstance(raw, list) and not raw:
        raise errors.bad_request("`prompt` must not be empty", param="prompt")
