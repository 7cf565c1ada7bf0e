"""ReplyAccumulator: the one fold of a reply (streamed or whole, chat or text) that both
the session store and the gateway's held-token bookkeeping use."""

from __future__ import annotations

from cluster.sessions.reply import ReplyAccumulator


def test_streamed_chat_with_tool_call_deltas() -> None:
    acc = ReplyAccumulator()
    acc.add({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me "}}]})
    acc.add({"choices": [{"index": 0, "delta": {"content": "check."}}]})
    acc.add(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "abc123XYZ", "type": "function", "function": {"name": "weather"}}
                        ]
                    },
                }
            ]
        }
    )
    acc.add(
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]}
    )
    acc.add({"choices": [{"index": 1, "delta": {"content": "ignored: choice 1"}}]})
    acc.add({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]})
    acc.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}], "usage": {"completion_tokens": 17}})
    assert acc.complete and acc.completion_tokens == 17
    assert acc.content == "Let me check."
    assert acc.tool_calls == [
        {"id": "abc123XYZ", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert acc.message()["tool_calls"] == acc.tool_calls


def test_whole_chat_response_equals_its_stream() -> None:
    call = {"id": "abc123XYZ", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    whole = ReplyAccumulator()
    whole.add_whole(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok", "tool_calls": [call]},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"completion_tokens": 3},
        }
    )
    assert whole.complete and whole.completion_tokens == 3
    assert whole.content == "ok" and whole.tool_calls == [call]


def test_text_completion_whole_and_streamed() -> None:
    whole = ReplyAccumulator()
    whole.add_whole({"choices": [{"index": 0, "text": "hello world", "finish_reason": "length"}]})
    streamed = ReplyAccumulator()
    for piece in ("hello", " world"):
        streamed.add({"choices": [{"index": 0, "text": piece, "finish_reason": None}]})
    assert whole.content == streamed.content == "hello world"
    assert whole.tool_calls == streamed.tool_calls == []


def test_error_event_makes_the_reply_incomplete() -> None:
    acc = ReplyAccumulator()
    acc.add({"choices": [{"index": 0, "delta": {"content": "partial"}}]})
    acc.add({"error": {"message": "engine died"}})
    assert not acc.complete
