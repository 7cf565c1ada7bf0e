"""`cluster.gateway.engine.EngineClient` on Ray Serve deployment handles.

Each pool is a ray.serve.llm LLMServer deployment (`engine-<pool>`). Its `chat` /
`completions` stream what vLLM's OpenAI layer produces: SSE strings (batched into lists by
Ray), a whole response model for a non-streamed request, or vLLM's `ErrorResponse`. This
turns them into `EngineChunk` dicts and errors; the pool's RequestRouter picks the replica
during the call.

Pools routed by Ray's KVAwareRouter (router.policy "ray-kv-aware") score on prompt token
ids passed as the call's `request_token_ids` keyword: the ids the gateway counted, from
the request's routing hint (deployments.engine.PoolEngine accepts and ignores them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from cluster.gateway import sse
from cluster.gateway.context import EngineChunk, RequestKind
from cluster.gateway.engine import EngineError, EngineUnavailable
from cluster.routing import hints as routing_hints
from cluster.upstream import ray_serve as upstream_ray
from cluster.upstream import vllm as upstream_vllm


class ServeEngineClient:
    def __init__(self, handles: dict[str, DeploymentHandle], token_id_pools: Collection[str] = ()) -> None:
        self._handles = {pool: h.options(stream=True) for pool, h in handles.items()}
        self._error_type = upstream_vllm.error_response_type()
        self._token_id_pools = set(token_id_pools)

    def _call_kwargs(self, pool: str, body: Any) -> dict[str, Any]:
        if pool not in self._token_id_pools:
            return {}
        hint = routing_hints.HINTS.get(str(getattr(body, "request_id", "") or ""))
        if hint is None or not hint.prompt_token_ids:
            return {}
        return {upstream_ray.REQUEST_TOKEN_IDS_KWARG: list(hint.prompt_token_ids)}

    async def generate(
        self,
        pool: str,
        kind: RequestKind,
        body: Any,
        *,
        session_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        handle = self._handles[pool]
        if session_id:
            handle = handle.options(session_id=session_id)
        # LLMServer.chat/completions(request, raw_request_info): vLLM's OpenAI layer gets a
        # request with these headers (its X-Request-Id is set from body.request_id).
        raw = upstream_ray.raw_request_info(dict(headers)) if headers else None
        try:
            async for item in getattr(handle, kind).remote(body, raw, **self._call_kwargs(pool, body)):
                for part in item if isinstance(item, list) else [item]:
                    for chunk in self._chunks(part):
                        yield chunk
        except (RayError, RayServeException, ConnectionError) as exc:
            raise EngineUnavailable(f"{type(exc).__name__} from pool {pool!r}") from exc

    def _chunks(self, part: Any) -> list[EngineChunk]:
        if isinstance(part, str):
            chunks = [EngineChunk(chunk) for chunk in sse.decode(part)]
            for chunk in chunks:
                error = chunk.data.get("error")
                if isinstance(error, dict) and _status(error) >= 500:
                    # The engine failed mid-stream (e.g. its core died): a replica failure.
                    raise EngineUnavailable(f"engine error {error.get('message', '')}")
            return chunks
        if isinstance(part, self._error_type):
            error = part.error  # type: ignore[attr-defined]
            if int(error.code) >= 500:
                raise EngineUnavailable(f"engine error {error.message}")
            raise EngineError(int(error.code), str(error.message), type=str(error.type))
        if hasattr(part, "model_dump"):
            return [EngineChunk(part.model_dump(mode="json"), whole=True)]
        raise EngineUnavailable(f"unexpected reply item {type(part).__name__}")


def _status(error: dict[str, Any]) -> int:
    try:
        return int(error.get("code") or 500)
    except (TypeError, ValueError):
        return 500
