"""The assistant reply of a completion, as the session stores it.

`ReplyAccumulator` folds streamed `chat.completion.chunk` objects (choice 0) into one
assistant message: content deltas are concatenated and tool-call deltas merged by their
`index` (id, type and function name arrive once, `arguments` in pieces). It also takes
`text_completion` chunks (`choices[0].text`) and whole responses (`add_whole`), so the
gateway uses the same fold for what the engine will cache.
`reply_from_completion` takes the message of a non-streamed response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.sessions.messages import Message, normalize_message


class ReplyAccumulator:
    def __init__(self) -> None:
        self._content: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self.error: Any = None
        self.chunks = 0

    def add(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk:
            self.error = chunk["error"]
            return
        usage = chunk.get("usage")
        if isinstance(usage, Mapping) and usage.get("completion_tokens") is not None:
            self.completion_tokens = int(usage["completion_tokens"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1: the session keeps choice 0
            self.chunks += 1
            if choice.get("text"):  # a text_completion chunk
                self._content.append(choice["text"])
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                self._merge_tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _merge_tool_call(self, call: Mapping[str, Any]) -> None:
        slot = self._tool_calls.setdefault(
            int(call.get("index", len(self._tool_calls))),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["function"]["name"] = fn["name"]
        if fn.get("arguments"):
            slot["function"]["arguments"] += fn["arguments"]

    def add_whole(self, response: Mapping[str, Any]) -> None:
        """A non-streamed `chat.completion` or `text_completion` response, as one chunk."""
        chunk: dict[str, Any] = {"usage": response.get("usage"), "choices": []}
        for choice in response.get("choices") or []:
            message = choice.get("message") or {}
            chunk["choices"].append(
                {
                    "index": choice.get("index", 0),
                    "text": choice.get("text"),
                    "delta": {"content": message.get("content"), "tool_calls": message.get("tool_calls")},
                    "finish_reason": choice.get("finish_reason"),
                }
            )
        self.add(chunk)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Merged tool calls in index order (OpenAI message shape)."""
        return [{k: v for k, v in self._tool_calls[i].items() if v is not None} for i in sorted(self._tool_calls)]

    @property
    def complete(self) -> bool:
        """A reply worth storing: no error, at least one choice chunk, and a finish reason."""
        return self.error is None and self.chunks > 0 and self.finish_reason is not None

    def message(self) -> Message:
        raw: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self._tool_calls:
            raw["tool_calls"] = self.tool_calls
        return normalize_message(raw, where="reply")


def reply_from_completion(response: Mapping[str, Any]) -> Message:
    """The assistant message of choice 0 of a `chat.completion` response dict."""
    choices = response.get("choices") or []
    if not choices:
        raise ValueError("completion has no choices")
    return normalize_message(choices[0]["message"], where="reply")


__all__ = ["ReplyAccumulator", "reply_from_completion"]
