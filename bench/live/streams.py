"""One streaming chat request as a client sees it: status, SSE events, the error events
and usage it carried, who served it, when its first chunk came and its largest gap
between chunks. Shared by `cluster bench chaos` and the fault / drain e2e tests, which
send `ignore_eos` requests with a fixed max_tokens, so a complete reply has exactly
max_tokens completion tokens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class StreamResult:
    status: int = 0  # 0: no answer yet, or the connection broke (see transport_error)
    started_at: float = 0.0  # time.monotonic() when the request was sent
    seconds: float = 0.0  # the whole request; 0 while it runs
    first_chunk_at: float | None = None  # time.monotonic() of the first SSE event
    max_gap_s: float = 0.0  # the longest wait between two pieces of the body
    events: list[str] = field(default_factory=list)  # `data:` payloads, "[DONE]" included
    body: str = ""  # the response body when the status is not 200
    served_by: str | None = None  # X-Served-By: the replica of the first attempt's answer
    attempts: int = 1  # X-Attempts: engine calls before the first chunk
    transport_error: str = ""

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    @property
    def done(self) -> bool:
        """The stream ended with `data: [DONE]`."""
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """OpenAI-style error events (`data: {"error": {...}}`)."""
        return [c["error"] for c in self.chunks if isinstance(c.get("error"), dict)]

    @property
    def usage(self) -> list[dict[str, Any]]:
        return [c["usage"] for c in self.chunks if c.get("usage")]

    @property
    def content_chunks(self) -> int:
        return sum(1 for c in self.chunks if c.get("choices"))

    @property
    def text(self) -> str:
        return "".join(
            (c["choices"][0].get("delta") or {}).get("content") or "" for c in self.chunks if c.get("choices")
        )

    def whole(self, max_tokens: int) -> bool:
        """200, [DONE] last, no error event, usage of exactly max_tokens completion tokens."""
        usage = self.usage
        return (
            self.status == 200
            and self.done
            and not self.errors
            and bool(usage)
            and usage[-1]["completion_tokens"] == max_tokens
        )

    def cut_with_error(self) -> bool:
        """A stream that began (200) and was ended by an error event, then [DONE]: the
        way a client learns that a reply is incomplete."""
        chunks = self.chunks
        return self.status == 200 and self.done and bool(chunks) and isinstance(chunks[-1].get("error"), dict)

    def why_not_whole(self, max_tokens: int) -> str:
        if self.transport_error:
            return self.transport_error
        if self.status != 200:
            return f"status {self.status}: {self.body[:160]}"
        if self.errors:
            return str(self.errors[0].get("message", self.errors[0]))[:200]
        usage = self.usage
        tokens = usage[-1]["completion_tokens"] if usage else None
        return f"{len(self.events)} events, done={self.done}, completion_tokens={tokens} (want {max_tokens})"


def mid_reply(streams: list[StreamResult]) -> dict[str, list[StreamResult]]:
    """The streams (filled through `stream_chat(..., into=)`) that have received content
    and are still open, by the replica streaming them (X-Served-By): a replica killed now
    certainly cuts these, so a fault test picks its victim from here, not by a timer."""
    out: dict[str, list[StreamResult]] = {}
    for s in list(streams):
        if s.served_by is not None and s.content_chunks > 0 and not s.done and s.seconds == 0:
            out.setdefault(s.served_by, []).append(s)
    return out


def chat_body(model: str, text: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_chat(
    http: httpx.Client,
    model: str,
    text: str,
    *,
    max_tokens: int,
    session_id: str | None = None,
    into: StreamResult | None = None,
) -> StreamResult:
    """POST one streaming chat and read it to the end; a broken connection is recorded,
    not raised (it is one of the outcomes being counted). With `into`, that result is
    filled as the stream goes (served_by once the headers came, events as they arrive,
    `seconds` only at the end), so another thread can watch a stream mid-reply."""
    headers = {"X-Session-ID": session_id} if session_id else {}
    result = into if into is not None else StreamResult()
    result.started_at = time.monotonic()
    last = result.started_at
    try:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(model, text, max_tokens), headers=headers) as r:
            result.served_by = r.headers.get("x-served-by")
            result.attempts = int(r.headers.get("x-attempts", "1"))
            if r.status_code != 200:
                result.body = r.read().decode(errors="replace")
            else:
                buf = ""
                for piece in r.iter_text():
                    now = time.monotonic()
                    result.max_gap_s, last = max(result.max_gap_s, now - last), now
                    buf += piece
                    *complete, buf = buf.split("\n\n")
                    events = [e[6:] for e in complete if e.startswith("data: ")]
                    if events and result.first_chunk_at is None:
                        result.first_chunk_at = now
                    result.events += events
            result.status = r.status_code
    except httpx.HTTPError as exc:  # the connection broke: what the client library saw
        result.transport_error = f"{type(exc).__name__}: {exc}"[:200]
        result.status = 0
    result.seconds = time.monotonic() - result.started_at
    return result
