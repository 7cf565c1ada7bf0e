"""Server-sent events in OpenAI's streaming format, encoded by the gateway itself.

A stream is `data: <chunk JSON>\n\n` events and a final `data: [DONE]\n\n`. An error after
the 200 status line has been sent is one `data: {"error": {...}}` event, then `[DONE]`,
so a client can always tell a cut reply from a finished one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

DONE = "data: [DONE]\n\n"


def encode(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"


def decode(text: str) -> Iterator[dict[str, Any]]:
    """The JSON chunks in a piece of SSE text (several events; `[DONE]` and comments skipped)."""
    for event in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].lstrip() for line in event.split("\n") if line.startswith("data:")]
        payload = "\n".join(lines).strip()
        if not payload or payload == "[DONE]":
            continue
        try:
            value = json.loads(payload)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


__all__ = ["DONE", "decode", "encode"]
