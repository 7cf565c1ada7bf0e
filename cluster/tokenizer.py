"""Prompt tokens, counted once per request at the gateway, exactly as the engine will.

The engines run vLLM with `tokenizer_mode="mistral"`. For a chat request vLLM's OpenAI
layer (vllm/renderers/online_renderer.py) serialises tool calls, truncates tool-call
ids, builds the chat-template kwargs from the request and calls
`vllm.renderers.mistral.safe_apply_chat_template`. We call the same functions with the
same tokenizer file, so the ids we count (and hand to the router for prefix matching)
are the ids the engine prefills. The tokenizer is Mistral-Large-Instruct-2411's v7
SentencePiece model that mistral-common ships; the gateway needs no model download.

`held_*` give the tokens of the conversation *including the reply*, encoded as the
next turn's prompt will start (mistral-common's finetuning mode encodes a final
assistant message, with `</s>`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cluster.config import ModelConfig
from cluster.tiny_model import bundled_v7_tokenizer
from cluster.upstream import vllm as upstream_vllm

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest


class PromptTokenizer:
    """Mistral v7 tokenization of OpenAI chat and completion requests."""

    def __init__(self, tokenizer_file: str | Path | None = None) -> None:
        path = str(tokenizer_file or bundled_v7_tokenizer())
        self.path = path
        self.vllm_tokenizer = upstream_vllm.mistral_tokenizer(path)
        # Finetuning mode accepts a final assistant message: the held conversation.
        self._history = upstream_vllm.history_backend(path)
        self._raw = self.vllm_tokenizer.tokenizer  # mistral-common's SentencePiece tokenizer

    @classmethod
    def for_model(cls, model: ModelConfig) -> PromptTokenizer:
        """The tokenizer of the configured checkpoint (see `tokenizer_file_for`)."""
        return cls(tokenizer_file_for(model))

    @property
    def eos_id(self) -> int:
        return int(self._raw.eos_id)

    # ---- chat -------------------------------------------------------------------

    @staticmethod
    def _template_kwargs(request: ChatCompletionRequest) -> dict[str, Any]:
        tool_dicts = None if request.tools is None else [tool.model_dump() for tool in request.tools]
        params = request.build_chat_params(None, "auto").with_defaults({"tools": tool_dicts, "tokenize": True})
        return params.get_apply_chat_template_kwargs()

    def chat_prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        """Token ids of a chat request's prompt. Raises ValueError on a conversation the
        Mistral template refuses (e.g. two system turns in the wrong place)."""
        upstream_vllm.prepare_chat_request(request)
        ids = upstream_vllm.apply_chat_template(
            self.vllm_tokenizer, list(request.messages), **self._template_kwargs(request)
        )
        if not isinstance(ids, list):  # tokenize=True always returns ids; guard the contract
            raise TypeError(f"expected token ids from the Mistral chat template, got {type(ids).__name__}")
        return [int(t) for t in ids]

    def chat_held_ids(
        self,
        request: ChatCompletionRequest,
        prompt_ids: Sequence[int],
        reply_text: str,
        tool_calls: Sequence[dict[str, Any]] = (),
    ) -> list[int]:
        """Tokens of the conversation including the assistant's reply, as the next turn
        starts. Plain text replies take the cheap path (prompt + reply + `</s>`, equal to
        the full encoding, see tests/test_tokenizer.py); tool calls re-encode in full."""
        if not tool_calls:
            return [*prompt_ids, *self._raw.encode(reply_text.rstrip(), bos=False, eos=False), self.eos_id]
        assistant: dict[str, Any] = {"role": "assistant", "content": reply_text or None, "tool_calls": list(tool_calls)}
        kwargs = self._template_kwargs(request)
        kwargs.pop("add_generation_prompt", None)
        kwargs.pop("continue_final_message", None)
        try:
            ids = self._history.apply_chat_template(
                conversation=cast(Any, [*request.messages, assistant]),
                tools=kwargs.get("tools"),
                tokenize=True,
                return_dict=False,
            )
        except Exception:
            # A reply mistral-common will not re-encode (e.g. a malformed tool call the
            # model produced): fall back to prompt + the reply's text.
            return [*prompt_ids, *self._raw.encode(reply_text.rstrip(), bos=False, eos=False), self.eos_id]
        return [int(t) for t in cast(list[int], ids)]

    # ---- completions ------------------------------------------------------------

    def completion_prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """vLLM encodes a completion prompt with BOS and without EOS."""
        if isinstance(prompt, str):
            return [int(t) for t in self.vllm_tokenizer.encode(prompt, add_special_tokens=True)]
        return [int(t) for t in prompt]

    def completion_held_ids(self, prompt_ids: Sequence[int], text: str) -> list[int]:
        return [*prompt_ids, *self._raw.encode(text, bos=False, eos=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.vllm_tokenizer.decode(list(ids)))

    def count_message_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Tokens of stored messages (session caps): each message's text and tool calls as
        this tokenizer encodes them, plus the two control tokens that frame a message."""
        total = 0
        for message in messages:
            parts = [_text(message.get("content"))]
            for call in message.get("tool_calls") or []:
                parts.append(json.dumps(call.get("function", call), ensure_ascii=False, sort_keys=True))
            text = "".join(parts)
            total += (len(self._raw.encode(text, bos=False, eos=False)) if text else 0) + 2
        return total


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)


# Tokenizer files of Mistral checkpoints, in the order vLLM's mistral mode prefers them.
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model")
# Checkpoints whose tokenizer is the v7 SentencePiece model mistral-common ships.
V7_CHECKPOINTS = ("Mistral-Large-Instruct-2411",)


def tokenizer_file_for(model: ModelConfig) -> Path:
    """The tokenizer the engines load for `model.source`: `model.tokenizer_file` when set,
    else the checkpoint folder's own file, else the bundled v7 file for the checkpoints that
    use it (the gateway runs without the weights). Anything else is refused at start: a
    wrong tokenizer would silently miscount tokens, pools and prefix hashes."""
    if model.tokenizer_file:
        return Path(model.tokenizer_file)
    if model.source.startswith("embedded:"):
        return bundled_v7_tokenizer()
    folder = Path(model.source)
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name
    if any(name in model.source for name in V7_CHECKPOINTS):
        return bundled_v7_tokenizer()
    raise ValueError(
        f"cannot tell the tokenizer of model.source {model.source!r}: set model.tokenizer_file to the checkpoint's "
        f"tokenizer ({' or '.join(TOKENIZER_FILES)}) so the gateway counts tokens as the engines do"
    )
