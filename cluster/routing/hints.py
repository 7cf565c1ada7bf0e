"""Hand-off between the gateway and the pools' RequestRouters in the same process.

Ray Serve runs a deployment handle's RequestRouter inside the process that owns the
handle, i.e. the gateway replica. The gateway tokenizes each request once and knows its
session, so it posts a `RoutingHint` under the request's id and the pool's router picks
it up instead of tokenizing again; the router writes its choice back. When the request
ends the gateway reports the block hashes the chosen replica now holds (`finish`), and
only the routers subscribed to that request's pool hear of it.

The board is a plain object; the one per process (`HINTS`) is module state because the
router class is shipped to the gateway by value and must find the gateway's board.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from threading import Lock


@dataclass
class RoutingHint:
    prompt_token_ids: Sequence[int]
    pool: str
    max_tokens: int = 0
    session_id: str | None = None
    affinity_replica: str | None = None
    # Chained block hashes of prompt_token_ids (cluster.routing.block_hash) at
    # `hash_block_size` tokens per block, computed off the event loop by the gateway; the
    # router hashes the tokens itself when its block size differs.
    block_hashes: Sequence[int] | None = None
    hash_block_size: int = 0
    # Replicas this request already failed on (retries and migrations go elsewhere).
    excluded_replicas: set[str] = field(default_factory=set)
    # Written by the router.
    chosen_replica: str | None = None
    matched_blocks: int = 0  # the policy's predicted cached prefix, in blocks
    reason: str = ""  # the policy's RouteDecision.reason ("fallback": the policy failed)
    routed_at: float | None = None  # time.monotonic() of the decision (same process)
    # The request id the policy was given: its finish releases what the policy holds for it.
    routed_request_id: str = ""


# (hint, block hashes of the conversation the replica now holds, its length in tokens)
FinishListener = Callable[[RoutingHint, Sequence[int], int], None]


class HintBoard:
    """Bounded, thread-safe map request_id -> RoutingHint (oldest dropped first, so a
    request that never reaches the router cannot leak memory)."""

    def __init__(self, capacity: int = 65536) -> None:
        self._capacity = capacity
        self._hints: OrderedDict[str, RoutingHint] = OrderedDict()
        self._lock = Lock()
        self._listeners: dict[str, list[FinishListener]] = {}

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

    def subscribe(self, pool: str, listener: FinishListener) -> Callable[[], None]:
        """Hear of finished requests of `pool`; returns the call that unsubscribes."""
        with self._lock:
            self._listeners.setdefault(pool, []).append(listener)

        def unsubscribe() -> None:
            with self._lock:
                listeners = self._listeners.get(pool, [])
                if listener in listeners:
                    listeners.remove(listener)

        return unsubscribe

    def listeners(self, pool: str) -> int:
        with self._lock:
            return len(self._listeners.get(pool, []))

    def finish(self, request_id: str, held_block_hashes: Sequence[int], held_tokens: int) -> None:
        """The gateway reports a completed request: the chain of the conversation including
        the reply, i.e. the prefix the next turn will start with."""
        hint = self.pop(request_id)
        if hint is None or hint.chosen_replica is None:
            return
        with self._lock:
            listeners = list(self._listeners.get(hint.pool, []))
        for listener in listeners:
            listener(hint, held_block_hashes, held_tokens)

    def __len__(self) -> int:
        return len(self._hints)


# One board per process: the gateway and the routers it owns share it.
HINTS = HintBoard()
