"""Hand-off between the gateway and the pool's RequestRouter in the same process.

The gateway tokenizes each request once (Mistral v7 tokenizer) and knows its session.
Ray Serve runs a deployment handle's RequestRouter inside the process that owns the
handle, i.e. the gateway replica, so the gateway posts a `RoutingHint` here under the
request's id and the router picks it up instead of tokenizing again. The router writes
its choice back so the gateway can record the session's replica.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from threading import Lock


@dataclass
class RoutingHint:
    prompt_token_ids: Sequence[int]
    max_tokens: int = 0
    session_id: str | None = None
    affinity_replica: str | None = None
    tenant: str | None = None
    pool: str | None = None
    text: str | None = None
    chosen_replica: str | None = None  # written by the router
    matched_blocks: int = 0  # written by the router
    extra: dict[str, object] = field(default_factory=dict)
    # Optional: chained block hashes of prompt_token_ids (cluster.routing.block_hash) at
    # `hash_block_size` tokens per block, computed off the event loop by the gateway
    # (0.7 ms per 32k tokens); the router hashes the tokens itself when absent.
    block_hashes: Sequence[int] | None = None
    hash_block_size: int = 0


FinishListener = Callable[[RoutingHint, Sequence[int]], None]


class HintBoard:
    """Bounded, process-local map request_id -> RoutingHint (oldest dropped first, so a
    request that never reaches the router cannot leak memory)."""

    def __init__(self, capacity: int = 65536) -> None:
        self._capacity = capacity
        self._hints: OrderedDict[str, RoutingHint] = OrderedDict()
        self._lock = Lock()
        self._listeners: list[FinishListener] = []

    def post(self, request_id: str, hint: RoutingHint) -> None:
        with self._lock:
            self._hints[request_id] = hint
            self._hints.move_to_end(request_id)
            while len(self._hints) > self._capacity:
                self._hints.popitem(last=False)

    def get(self, request_id: str) -> RoutingHint | None:
        with self._lock:
            return self._hints.get(request_id)

    def pop(self, request_id: str) -> RoutingHint | None:
        with self._lock:
            return self._hints.pop(request_id, None)

    def add_listener(self, listener: FinishListener) -> None:
        """Routers subscribe to learn what each replica caches once a request ends."""
        self._listeners.append(listener)

    def finish(self, request_id: str, held_token_ids: Sequence[int]) -> None:
        """The gateway reports a completed request with `held_token_ids`: the tokens of the
        conversation including the reply, i.e. the prefix the next turn will start with."""
        hint = self.pop(request_id)
        if hint is None or hint.chosen_replica is None:
            return
        for listener in list(self._listeners):
            listener(hint, held_token_ids)

    def __len__(self) -> int:
        return len(self._hints)


# One board per process: the gateway and the routers it owns share it.
HINTS = HintBoard()
