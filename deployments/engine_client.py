"""`cluster.gateway.engine.EngineClient` on Ray Serve deployment handles.

Each pool is a ray.serve.llm LLMServer deployment (`engine-<pool>`). Its `chat` /
`completions` stream what vLLM's OpenAI layer produces: SSE strings (batched into lists by
Ray), a whole response model for a non-streamed request, or vLLM's `ErrorResponse`. This
turns them into `EngineChunk` dicts and errors; the pool's RequestRouter picks the replica
during the call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from cluster.gateway import sse
from cluster.gateway.context import EngineChunk, RequestKind
from cluster.gateway.engine import EngineError, EngineUnavailable
from cluster.upstream import ray_serve as upstream_ray
from cluster.upstream import vllm as upstream_vllm


class ServeEngineClient:
    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self._handles = {pool: h.options(stream=True) for pool, h in handles.items()}
        self._error_type = upstream_vllm.error_response_type()

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
            async for item in getattr(handle, kind).remote(body, raw):
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
