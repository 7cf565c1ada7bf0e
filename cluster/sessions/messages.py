"""Chat messages as sessions store them: OpenAI chat format, plain JSON dicts.

Validation here is structural only (roles, types); the engine's Mistral validator still
checks the conversation it receives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cluster.sessions.errors import InvalidSessionRequest

Message = dict[str, Any]
TokenCounter = Callable[[Sequence[Message]], int]

ROLES = ("system", "user", "assistant", "tool")
# Keys of a message we keep; anything else (e.g. vLLM's "reasoning_content": null,
# "refusal") is dropped so the stored history is what the model is shown next time.
_KEPT_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "prefix")


def normalize_message(raw: Any, *, where: str) -> Message:
    if hasattr(raw, "model_dump"):  # a pydantic message object (vLLM, openai SDK)
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, Mapping):
        raise InvalidSessionRequest(f"{where}: a message must be an object, got {type(raw).__name__}", param="messages")
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidSessionRequest(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}", param="messages")
    msg: Message = {}
    for key in _KEPT_KEYS:
        value = _plain(raw.get(key))
        if value is None or (key == "tool_calls" and not value):
            continue
        msg[key] = value
    if role == "assistant" and "content" not in msg and "tool_calls" not in msg:
        msg["content"] = ""
    return msg


def _plain(value: Any) -> Any:
    """JSON-ready copy: pydantic objects dumped, iterators (pydantic's ValidatorIterator for
    `Iterable` content parts) materialised."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(exclude_none=True))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_plain(v) for v in value]
    return value


def normalize_messages(raw: Any, *, where: str = "messages") -> list[Message]:
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise InvalidSessionRequest(f"{where} must be a list of messages", param="messages")
    return [normalize_message(m, where=f"{where}[{i}]") for i, m in enumerate(raw)]


def split_leading_system(messages: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    """(leading system messages, the rest)."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    return list(messages[:i]), list(messages[i:])


def approx_tokens(messages: Sequence[Message]) -> int:
    """A tokenizer-free estimate (about 4 characters per token plus per-message framing);
    the gateway passes its Mistral tokenizer count instead where it has one."""
    chars = len(json.dumps(list(messages), ensure_ascii=False, separators=(",", ":")))
    return max(1, math.ceil(chars / 4)) if messages else 0


def canonical_json(messages: Sequence[Message]) -> str:
    return json.dumps(list(messages), ensure_ascii=False, separators=(",", ":"))


__all__ = [
    "Message",
    "ROLES",
    "TokenCounter",
    "approx_tokens",
    "canonical_json",
    "normalize_message",
    "normalize_messages",
    "split_leading_system",
]
