"""The Ray glue's pure parts, with the real Ray Serve and vLLM types (no cluster)."""

from __future__ import annotations

import ray.cloudpickle as cloudpickle
from ray.serve.config import RequestRouterConfig
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from cluster.routing import hints
from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.hints import RoutingHint
from deployments.request_router import replica_view, request_from_body, request_from_hint

ROUTER = "deployments.request_router:PolicyRequestRouter"


def test_ray_ships_the_router_class_and_it_uses_this_process_hint_board() -> None:
    # Ray pickles the router's module by value; state it reaches must not be copied.
    config = RequestRouterConfig(
        request_router_class=ROUTER, request_router_kwargs={"policy": "cache-aware", "block_size": 16, "options": {}}
    )
    cls = cloudpickle.loads(config.get_serialized_request_router_cls())
    assert cls.__name__ == "PolicyRequestRouter"
    assert cls.__init__.__globals__["routing_hints"] is hints


def test_replica_view_from_routing_stats() -> None:
    stats = {
        "num_waiting": 3,
        "num_running": 7,
        "kv_usage": 0.4,
        "kv_capacity_blocks": 900,
        "max_num_seqs": 64,
        "block_size": 16,
        "kv_events_endpoint": "tcp://x",
    }
    v = replica_view("abc", stats, in_flight=2)
    assert (v.replica_id, v.num_waiting, v.num_running, v.kv_usage) == ("abc", 3, 7, 0.4)
    assert (v.kv_capacity_blocks, v.max_num_seqs, v.in_flight, v.load) == (900, 64, 2, 12)
    empty = replica_view("abc", None)
    assert empty.load == 0 and empty.kv_capacity_blocks == 0 and empty.max_num_seqs == 256


def test_request_from_hint_hashes_the_gateway_tokens() -> None:
    ids = list(range(100))
    hint = RoutingHint(prompt_token_ids=ids, max_tokens=20, session_id="s1", affinity_replica="r2")
    req = request_from_hint("rid", hint, 16)
    assert req.block_hashes == chain_block_hashes(ids, 16) and len(req.block_hashes) == 6
    assert (req.prompt_tokens, req.max_tokens, req.session_id, req.affinity_replica) == (100, 20, "s1", "r2")


def test_request_from_body_without_hint() -> None:
    history = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi there " * 10}]
    a = ChatCompletionRequest.model_validate({"model": "m", "messages": history, "max_tokens": 5})
    follow_up = [*history, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    b = ChatCompletionRequest.model_validate({"model": "m", "messages": follow_up, "session_id": "sess"})
    ra, rb = request_from_body(a.request_id, a, 16), request_from_body(b.request_id, b, 16)
    assert ra.max_tokens == 5 and rb.session_id == "sess"
    assert len(ra.block_hashes) > 3
    assert rb.block_hashes[: len(ra.block_hashes) - 1] == ra.block_hashes[:-1]  # the history is a shared prefix
    c = CompletionRequest.model_validate({"model": "m", "prompt": list(range(40))})
    rc = request_from_body(c.request_id, c, 16)
    assert rc.block_hashes == chain_block_hashes(list(range(40)), 16)


def test_request_from_hint_uses_gateway_hashes_of_the_same_block_size() -> None:
    ids = list(range(64))
    pre = chain_block_hashes(ids, 16)
    same = RoutingHint(prompt_token_ids=ids, block_hashes=pre, hash_block_size=16)
    assert request_from_hint("r", same, 16).block_hashes is pre
    # Hashed at another block size: the router rehashes at the engine's.
    other = RoutingHint(prompt_token_ids=ids, block_hashes=chain_block_hashes(ids, 32), hash_block_size=32)
    assert list(request_from_hint("r", other, 16).block_hashes) == pre
