"""Ray Serve glue: a RequestRouter that lets a `cluster.routing` policy pick the replica.

Thin by design; every decision is the policy's (the same object the simulator and the
unit tests drive). Per request, `choose_replicas`:

1. builds a `ReplicaView` per candidate from `RunningReplica.routing_stats` (what each
   engine replica reports via `record_routing_stats`: num_waiting, num_running,
   kv_usage, kv_capacity_blocks, max_num_seqs) plus the requests this router sent that
   the replica's stats cannot show yet;
2. reads the gateway's `RoutingHint` from `cluster.routing.hints.HINTS`, keyed by the
   request id: `pending_request.args[0]` is the vLLM ChatCompletionRequest /
   CompletionRequest and its `.request_id` is the key (the gateway sets it); without a
   hint it hashes what the request carries (token ids of a completion prompt, else
   pseudo-tokens of the text) and keeps session affinity in a small local map;
3. calls `policy.choose`, writes `chosen_replica` / `matched_blocks` back into the hint
   and returns `[[replica]]` (a single pinned choice: if the replica rejects the request
   because it is full, Ray marks its queue full and calls us again, and the full replica
   is then left out of the candidates); the prefix index's update for the choice
   (`PrefixIndex.flush`) is scheduled on the loop, after the request is sent.

When the gateway reports a request of this router's pool finished (it hashes the held
conversation, prompt + reply, off its event loop), the listener feeds
`policy.on_finished` on the router's own event loop, so the policy is only ever touched
from one thread, and then applies the index update that finish queued, so the next
decision does not. The subscription ends with the router. Replica set changes reach
`policy.on_replicas_changed`. Nothing here blocks the event loop.

With `router.kv_events` on, the engine replicas report where they publish their KV cache
events (routing stats `kv_events_endpoint`, `kv_events_replay_endpoint`) and this router
subscribes to each (cluster.routing.kv_events): the policy's prefix index then follows
every such replica's engine exactly (its own guesses are ignored for it); a replica
without events (not reported yet, or its socket failed) keeps the approximation. A new
router (a gateway restart) rebuilds the index from the engines' replay buffers; a replica
that leaves the pool takes its state with it.

Replica ids are `ReplicaID.unique_id` strings: the id an engine replica sees as
`serve.get_replica_context().replica_id.unique_id`, written into `hint.chosen_replica`.

Configured per pool by `deployments.app.request_router_config`:
    request_router_class="deployments.request_router:PolicyRequestRouter",
    request_router_kwargs={"policy": ..., "block_size": ..., "options": {...}}
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.routing import hints as routing_hints
from cluster.routing import replica_health
from cluster.routing.block_hash import chain_block_hashes, text_pseudo_tokens
from cluster.routing.hints import RoutingHint
from cluster.routing.kv_events import KvEventSubscriber, endpoints_from_stats
from cluster.routing.policy import ReplicaView, RouteRequest
from cluster.routing.registry import make_policy

logger = logging.getLogger("ray.serve")
# Ray Serve pickles this module *by value* to ship the router class (RequestRouterConfig
# registers it with cloudpickle), so module-level objects the class uses would be copied.
# The hint board must be the process's own: it is always reached through its module.

_SESSION_MAP_SIZE = 65536


def replica_view(replica_id: str, stats: Mapping[str, Any] | None, in_flight: int = 0) -> ReplicaView:
    """A policy's view of one replica from its reported routing stats (missing keys:
    defaults, e.g. before the first stats arrive)."""
    s = stats or {}

    def num(key: str, default: float) -> float:
        v = s.get(key, default)
        return float(v) if isinstance(v, (int, float)) else default

    return ReplicaView(
        replica_id=replica_id,
        num_waiting=int(num("num_waiting", 0)),
        num_running=int(num("num_running", 0)),
        kv_usage=num("kv_usage", 0.0),
        max_num_seqs=max(1, int(num("max_num_seqs", 256))),
        kv_capacity_blocks=int(num("kv_capacity_blocks", 0)),
        in_flight=max(0, in_flight),
    )


def _wedged(replica: RunningReplica) -> bool:
    stats = replica.routing_stats or {}
    return bool(stats.get("wedged"))


def _text_of(value: Any) -> str:
    """Prompt text of OpenAI messages/prompt values (strings, content parts, dicts)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return str(value["text"])
        return str(value.get("role", "")) + _text_of(value.get("content"))
    content = getattr(value, "content", None)
    return _text_of(content) if content is not None else ""


def request_from_body(request_id: str, body: Any, block_size: int) -> RouteRequest:
    """A RouteRequest from an OpenAI request body alone (no gateway hint)."""
    prompt = getattr(body, "prompt", None)
    tokens: list[int]
    text: str | None = None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        tokens = [int(t) for t in prompt]
    else:
        source = prompt if prompt is not None else getattr(body, "messages", None)
        text = _text_of(source)
        tokens = text_pseudo_tokens(text)
    max_tokens = getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None) or 0
    session = getattr(body, "session_id", None)
    return RouteRequest(
        request_id=request_id,
        prompt_tokens=len(tokens),
        block_hashes=chain_block_hashes(tokens, block_size),
        max_tokens=int(max_tokens),
        session_id=session if isinstance(session, str) and session else None,
        text=text,
    )


def request_from_hint(request_id: str, hint: RoutingHint, block_size: int) -> RouteRequest:
    if hint.block_hashes is not None and hint.hash_block_size == block_size:
        hashes = hint.block_hashes  # hashed by the gateway, off the event loop
    else:
        hashes = chain_block_hashes(hint.prompt_token_ids, block_size)
    return RouteRequest(
        request_id=request_id,
        prompt_tokens=len(hint.prompt_token_ids),
        block_hashes=hashes,
        max_tokens=hint.max_tokens,
        session_id=hint.session_id,
        affinity_replica=hint.affinity_replica,
    )


class PolicyRequestRouter(RequestRouter):
    """Ray Serve RequestRouter deciding through a `cluster.routing` policy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._block_size = 16
        self._pool: str | None = None
        self._policy = make_policy("cache-aware", block_size=self._block_size)
        self._known_ids: set[str] = set()
        # Requests sent and not completed, and those sent since the replica's stats last
        # changed: the latter, capped by the former, are what the stats cannot show yet.
        self._outstanding: defaultdict[str, int] = defaultdict(int)
        self._unreported: defaultdict[str, int] = defaultdict(int)
        # replica id -> (the last stats it reported, in flight, the view built from them)
        self._views: dict[str, tuple[Mapping[str, Any], int, ReplicaView]] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()  # fallback affinity, no hint
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._exclude_failed_s = 30.0
        self._kv_topic: str | None = None  # None: KV events off
        self._kv: KvEventSubscriber | None = None
        self._kv_endpoints: dict[str, tuple[str, str | None]] | None = None  # not yet applied

    def initialize_state(
        self,
        policy: str = "cache-aware",
        block_size: int = 16,
        options: Mapping[str, Any] | None = None,
        pool: str | None = None,
        exclude_failed_s: float = 30.0,
        kv_events: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """Called by Ray Serve with `request_router_kwargs`."""
        self._block_size = block_size
        self._exclude_failed_s = exclude_failed_s
        self._pool = pool
        self._policy = make_policy(policy, block_size=block_size, **dict(options or {}))
        if pool is not None:
            self._subscribe(pool)
        if kv_events and kv_events.get("enabled"):
            if getattr(self._policy, "index", None) is None:
                logger.warning(f"policy {policy} keeps no prefix index: KV events are not consumed")
            else:
                self._kv_topic = str(kv_events.get("topic") or "")
        logger.info(
            f"PolicyRequestRouter: policy={policy} block_size={block_size} pool={pool} "
            f"kv_events={'on' if self._kv_topic is not None else 'off'}"
        )

    # --- KV cache events -----------------------------------------------------------

    def _follow_kv_events(self, replicas: Sequence[RunningReplica]) -> None:
        """Note the event endpoints the replicas report; subscribe now if on the loop."""
        if self._kv_topic is None:
            return
        stats = {r.replica_id.unique_id: r.routing_stats for r in replicas}
        self._kv_endpoints = endpoints_from_stats(stats)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # applied by the next decision, on the router's loop
        self._apply_kv_endpoints()

    def _apply_kv_endpoints(self) -> None:
        endpoints, self._kv_endpoints = self._kv_endpoints, None
        if endpoints is None or self._kv_topic is None:
            return
        if self._kv is None:
            index = self._policy.index  # type: ignore[attr-defined]
            self._kv = KvEventSubscriber(index, self._block_size, topic=self._kv_topic)
        before = set(self._kv.replicas)
        self._kv.set_replicas(endpoints)
        if set(self._kv.replicas) != before:
            logger.info(f"PolicyRequestRouter[{self._pool}]: KV events from {sorted(endpoints.values())}")

    def kv_event_stats(self) -> dict[str, dict[str, int]]:
        """Per replica: blocks stored / removed / unmapped as the events reported them."""
        if self._kv is None:
            return {}
        return {
            rid: {"stored": r.stored, "removed": r.removed, "unmapped": r.unmapped, "next_seq": r.next_seq or 0}
            for rid, r in self._kv.replicas.items()
        }

    def _subscribe(self, pool: str) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        ref = weakref.ref(self)
        unsubscribe: Callable[[], None] | None = None

        def on_finish(hint: RoutingHint, held_block_hashes: Sequence[int], held_tokens: int) -> None:
            router = ref()
            if router is None:  # the router is gone: stop listening
                if unsubscribe is not None:
                    unsubscribe()
                return
            router._on_hint_finished(hint, held_block_hashes, held_tokens)

        unsubscribe = routing_hints.HINTS.subscribe(pool, on_finish)
        self._unsubscribe = unsubscribe
        weakref.finalize(self, unsubscribe)

    # --- the decision ------------------------------------------------------------

    def _view(self, replica: RunningReplica) -> ReplicaView:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        cached = self._views.get(rid)
        if cached is None or (stats is not cached[0] and stats != cached[0]):
            self._unreported[rid] = 0  # a new report: it covers what was sent before
            cached = None
        in_flight = min(self._unreported[rid], self._outstanding[rid])
        # Stats change once a period and in-flight counts once a request: between them
        # the view is the same, and building 64 of them cost more than the decision.
        if cached is not None and cached[1] == in_flight:
            return cached[2]
        last = stats if cached is None else cached[0]
        view = replica_view(rid, last, in_flight)
        self._views[rid] = (last, in_flight, view)
        return view

    def _hint_of(self, pending: PendingRequest | None) -> RoutingHint | None:
        if pending is None:
            return None
        body = pending.args[0] if pending.args else None
        for key in (getattr(body, "request_id", None), pending.metadata.request_id):
            if isinstance(key, str) and key:
                hint = routing_hints.HINTS.get(key)
                if hint is not None:
                    return hint
        return None

    def _route_request(self, pending: PendingRequest | None) -> tuple[RouteRequest, RoutingHint | None]:
        if pending is None:
            return RouteRequest(request_id="", prompt_tokens=0), None
        body = pending.args[0] if pending.args else None
        keys = [getattr(body, "request_id", None), pending.metadata.request_id, pending.metadata.internal_request_id]
        for key in keys:
            if isinstance(key, str) and key:
                hint = routing_hints.HINTS.get(key)
                if hint is not None:
                    return request_from_hint(key, hint, self._block_size), hint
        request_id = next((k for k in keys if isinstance(k, str) and k), "")
        request = request_from_body(request_id, body, self._block_size)
        session = request.session_id or pending.metadata.session_id or None
        if session:
            affinity = self._sessions.get(session)
            request = RouteRequest(
                request_id=request.request_id,
                prompt_tokens=request.prompt_tokens,
                block_hashes=request.block_hashes,
                max_tokens=request.max_tokens,
                session_id=session,
                affinity_replica=affinity,
                text=request.text,
            )
        return request, None

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._kv_endpoints is not None:
            self._apply_kv_endpoints()
        # Leave out replicas Ray knows to be at max_ongoing_requests (it learns that from
        # a rejection), unless that leaves nothing.
        candidates = self.select_available_replicas(candidate_replicas) or candidate_replicas
        try:
            request, hint = self._route_request(pending_request)
        except Exception:  # an odd body must degrade routing, not stall it
            logger.exception("reading the request for routing failed; routing it as an empty prompt")
            request, hint = RouteRequest(request_id="", prompt_tokens=0), None
        candidates = self._healthy(candidates, hint)
        by_id = {r.replica_id.unique_id: r for r in candidates}
        views = [self._view(r) for r in candidates]
        try:
            decision = self._policy.choose(request, views)
        except Exception:  # a policy bug must degrade routing, not stall every request
            logger.exception(f"routing policy {self._policy.name} failed; sending to the least-loaded replica")
            fallback = min(candidates, key=lambda r: self._view(r).load)
            hint = self._hint_of(pending_request)
            if hint is not None:
                hint.chosen_replica, hint.matched_blocks = fallback.replica_id.unique_id, 0
                hint.reason, hint.routed_at = "fallback", time.monotonic()
            return [[fallback]]
        chosen = by_id.get(decision.replica_id)
        if chosen is None:
            logger.warning(f"policy {self._policy.name} chose unknown replica {decision.replica_id}")
            chosen = candidates[0]
        chosen_id = chosen.replica_id.unique_id
        if hint is not None:
            hint.chosen_replica = chosen_id
            hint.matched_blocks = decision.matched_blocks
            hint.reason = decision.reason if chosen is by_id.get(decision.replica_id) else "fallback"
            hint.routed_at = time.monotonic()
            hint.routed_request_id = request.request_id
        elif request.session_id:
            self._sessions[request.session_id] = chosen_id
            self._sessions.move_to_end(request.session_id)
            while len(self._sessions) > _SESSION_MAP_SIZE:
                self._sessions.popitem(last=False)
        # The index update the decision queued (the chosen replica's chain, pinned) runs
        # once this request is on its way; the next decision would apply it anyway.
        self._loop.call_soon(self._apply_index_updates)
        return [[chosen]]

    def _apply_index_updates(self) -> None:
        """Index maintenance that decisions and finishes queue (`PrefixIndex.flush`): run
        after them on the loop, so no routing decision waits for it."""
        index = getattr(self._policy, "index", None)
        if index is not None:
            index.flush()

    def _finished(self, request: RouteRequest, replica: str, held_block_hashes: list[int]) -> None:
        self._policy.on_finished(request, replica, held_block_hashes)
        self._apply_index_updates()

    def _healthy(self, candidates: list[RunningReplica], hint: RoutingHint | None) -> list[RunningReplica]:
        """Candidates that neither failed recently (in this process), nor this request, nor
        report a wedged engine; all of them when that leaves none."""
        excluded = hint.excluded_replicas if hint is not None else ()
        ids = [r.replica_id.unique_id for r in candidates]
        usable = replica_health.HEALTH.usable(ids, excluded)
        kept = [r for r, rid in zip(candidates, ids, strict=True) if rid in usable and not _wedged(r)]
        return kept or candidates

    # --- bookkeeping hooks -------------------------------------------------------

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        rid = replica_id.unique_id
        self._outstanding[rid] += 1
        self._unreported[rid] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        rid = replica_id.unique_id
        self._outstanding[rid] = max(0, self._outstanding[rid] - 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # New routing stats arrive here: a replica reporting a wedged engine is marked for
        # the whole gateway, so the requests waiting on it fail over (dispatch watches).
        for r in replicas:
            if _wedged(r):
                replica_health.HEALTH.mark_failed(r.replica_id.unique_id, self._exclude_failed_s)
        self._follow_kv_events(replicas)
        ids = {r.replica_id.unique_id for r in replicas}
        if ids != self._known_ids:
            self._known_ids = ids
            if self._pool is not None:  # where the gateway's requests on this pool can go
                replica_health.HEALTH.set_pool(self._pool, ids)
            for table in (self._outstanding, self._unreported, self._views):
                for rid in [r for r in table if r not in ids]:
                    del table[rid]
            self._policy.on_replicas_changed(sorted(ids))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._known_ids.discard(replica_id.unique_id)
        if self._pool is not None:
            replica_health.HEALTH.set_pool(self._pool, self._known_ids)
        self._policy.on_replicas_changed(sorted(self._known_ids))

    def _on_hint_finished(self, hint: RoutingHint, held_block_hashes: Sequence[int], held_tokens: int) -> None:
        """Runs in the gateway's thread; the policy is updated on the router's own loop."""
        replica = hint.chosen_replica
        if replica is None or replica not in self._known_ids or hint.hash_block_size != self._block_size:
            return
        # The id the policy routed it under: its in-flight state (pinned blocks, KV owed,
        # decode exposure) is released by it.
        request = RouteRequest(request_id=hint.routed_request_id, prompt_tokens=held_tokens, session_id=hint.session_id)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._finished, request, replica, list(held_block_hashes))


__all__ = [
    "PolicyRequestRouter",
    "replica_view",
    "request_from_body",
    "request_from_hint",
]
