"""The strict public API: which request fields a client may send, and the OpenAPI
document that says so.

The engines' request models (vLLM's, through Ray Serve LLM) accept dozens of internal
fields: `kv_transfer_params`, `vllm_xargs`, `priority`, `request_id`, `cache_salt`, ...
Only the gateway sets those. A client may send the OpenAI fields below plus our short
list of extensions; any other field is refused with 400 naming it, as the OpenAI API
answers an unknown argument. Bodies are parsed here (not by FastAPI) so that every
malformed body, including those that make the engine model's validators raise
TypeError or IndexError (`"messages": null`), is a 400 with an OpenAI error body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from cluster import errors
from cluster.gateway.context import RequestKind
from cluster.upstream import vllm as upstream_vllm

# OpenAI's chat and completion request fields that vLLM implements.
OPENAI_CHAT_FIELDS = frozenset(
    {
        "model", "messages", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
        "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream",
        "stream_options", "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "user",
    }
)  # fmt: skip
OPENAI_COMPLETION_FIELDS = frozenset(
    {
        "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
        "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
    }
)  # fmt: skip
# Our extensions (documented in README "The API"): the session of a chat, and sampling
# parameters of vLLM that are safe for any client (length stays bounded by max_tokens and
# the tenant's cap; load generators need ignore_eos for a fixed reply length).
SAMPLING_EXTENSIONS = frozenset({"top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens"})
CHAT_EXTENSIONS = frozenset({"session_id"}) | SAMPLING_EXTENSIONS
COMPLETION_EXTENSIONS = SAMPLING_EXTENSIONS

ALLOWED_FIELDS: dict[RequestKind, frozenset[str]] = {
    "chat": OPENAI_CHAT_FIELDS | CHAT_EXTENSIONS,
    "completions": OPENAI_COMPLETION_FIELDS | COMPLETION_EXTENSIONS,
}


def unrecognized(field: str) -> errors.APIError:
    return errors.bad_request(f"Unrecognized request argument supplied: {field}", param=field, code="unknown_parameter")


def validation_error(details: Sequence[Mapping[str, Any]]) -> errors.APIError:
    """A pydantic validation failure as a 400 naming the first offending parameter."""
    first = details[0] if details else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request"))
    if param:
        message = f"{message} (at `{param}`)"
    return errors.bad_request(f"Invalid request: {message}", param=param, code="invalid_parameter")


def check_fields(kind: RequestKind, data: Mapping[str, Any]) -> None:
    allowed = ALLOWED_FIELDS[kind]
    for name in data:
        if name not in allowed:
            raise unrecognized(name)
    if kind == "chat":
        messages = data.get("messages")
        if messages is None:
            raise errors.bad_request("`messages` is required: a non-empty list of messages", param="messages")
        if not isinstance(messages, list) or not messages:
            raise errors.bad_request("`messages` must be a non-empty list of messages", param="messages")
    elif data.get("prompt") is None:
        raise errors.bad_request("`prompt` is required", param="prompt")


def parse_request(kind: RequestKind, raw: bytes, model: type) -> Any:
    """The engine request model of a public request body; 400 for anything malformed."""
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise errors.invalid_json(str(exc)) from None
    if not isinstance(data, dict):
        raise errors.bad_request("the request body must be a JSON object")
    check_fields(kind, data)
    try:
        return model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        # The engine model's own validators may fail on shapes they did not expect.
        raise errors.bad_request(f"Invalid request: {exc}") from None
    except Exception as exc:
        if isinstance(exc, upstream_vllm.client_error_type()):
            param = getattr(exc, "parameter", None)
            raise errors.bad_request(f"Invalid request: {exc}", param=param, code="invalid_parameter") from None
        raise


def public_schemas(kind: RequestKind, model: type) -> dict[str, Any]:
    """OpenAPI component schemas of a request model cut to the public fields (the
    model's schema plus the definitions it refers to)."""
    name = "ChatCompletionRequest" if kind == "chat" else "CompletionRequest"
    schema: dict[str, Any] = model.model_json_schema(  # type: ignore[attr-defined]
        ref_template="#/components/schemas/{model}", mode="validation"
    )
    defs: dict[str, Any] = schema.pop("$defs", {})
    allowed = ALLOWED_FIELDS[kind]
    schema["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k in allowed}
    required = {"messages"} if kind == "chat" else {"prompt"}
    schema["required"] = sorted(required | (set(schema.get("required", [])) & allowed))
    if kind == "chat":
        schema["properties"]["messages"]["minItems"] = 1
    schema["additionalProperties"] = False
    schema["title"] = name
    return {name: schema, **_reachable(schema, defs)}


def _reachable(schema: Any, defs: Mapping[str, Any]) -> dict[str, Any]:
    """The definitions `schema` refers to, transitively (drops those of internal fields)."""
    out: dict[str, Any] = {}
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name in defs and name not in out:
                    out[name] = defs[name]
                    todo.append(defs[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return out


def body_spec(name: str) -> dict[str, Any]:
    """`openapi_extra` of an endpoint whose JSON body the handler parses itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


CREATE_SESSION_SCHEMA: dict[str, Any] = {
    "title": "CreateSessionRequest",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "system_prompt": {"type": "string", "description": "the conversation's system prompt"},
        "metadata": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "string labels kept with the session",
        },
    },
}


__all__ = [
    "ALLOWED_FIELDS",
    "CREATE_SESSION_SCHEMA",
    "body_spec",
    "check_fields",
    "parse_request",
    "public_schemas",
    "unrecognized",
    "validation_error",
]
