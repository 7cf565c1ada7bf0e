"""The gateway's prompt tokenizer (Mistral v7, as vLLM's mistral tokenizer mode encodes).
The end-to-end tests check its counts against the engine's own `usage.prompt_tokens`."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.tokenizer import PromptTokenizer

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "w", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer()


def _request(messages: list[dict[str, Any]], **kw: Any) -> Any:
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

    return ChatCompletionRequest(model="m", messages=messages, **kw)


def test_chat_prompt_is_the_v7_template(tok: PromptTokenizer) -> None:
    req = _request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    text = tok.decode(tok.chat_prompt_ids(req))
    assert text.startswith("<s>[SYSTEM_PROMPT]")
    assert text.endswith("[/INST]")


def test_tools_are_part_of_the_prompt(tok: PromptTokenizer) -> None:
    msgs = [{"role": "user", "content": "Weather?"}]
    plain = tok.chat_prompt_ids(_request(msgs))
    with_tools = tok.chat_prompt_ids(_request(msgs, tools=[TOOL]))
    assert len(with_tools) > len(plain)
    assert "[AVAILABLE_TOOLS]" in tok.decode(with_tools)


@pytest.mark.parametrize("reply", ["Hello! How are you?", "two\nlines", " padded reply  "])
def test_cheap_held_tokens_equal_the_full_encoding(tok: PromptTokenizer, reply: str) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    req = _request(msgs)
    prompt = tok.chat_prompt_ids(req)
    cheap = tok.chat_held_ids(req, prompt, reply)
    full = tok._history.apply_chat_template(
        conversation=[*msgs, {"role": "assistant", "content": reply}], tokenize=True, return_dict=False
    )
    assert cheap == list(full)
    assert cheap[: len(prompt)] == prompt and cheap[-1] == tok.eos_id


def test_held_tokens_with_a_tool_call_extend_the_prompt(tok: PromptTokenizer) -> None:
    req = _request([{"role": "user", "content": "Weather in Paris?"}], tools=[TOOL])
    prompt = tok.chat_prompt_ids(req)
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    held = tok.chat_held_ids(req, prompt, "", [call])
    assert held[: len(prompt)] == prompt
    assert "[TOOL_CALLS]" in tok.decode(held[len(prompt) :])


def test_completion_prompt_has_bos(tok: PromptTokenizer) -> None:
    ids = tok.completion_prompt_ids("hello world")
    assert ids[0] == 1 and len(ids) >= 3
    assert tok.completion_prompt_ids([5, 6, 7]) == [5, 6, 7]
    assert tok.completion_held_ids(ids, " again")[: len(ids)] == ids


def test_a_conversation_the_template_refuses_is_a_value_error(tok: PromptTokenizer) -> None:
    with pytest.raises(ValueError):
        tok.chat_prompt_ids(_request([{"role": "assistant", "content": "I start?"}], add_generation_prompt=True))
