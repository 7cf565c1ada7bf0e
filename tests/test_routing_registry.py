"""The registry builds every policy by name, and each honours the RoutingPolicy contract."""

from __future__ import annotations

import pytest

from cluster.routing.block_hash import chain_block_hashes
from cluster.routing.policy import ReplicaView, RouteRequest, RoutingPolicy
from cluster.routing.registry import BASELINE_NAMES, POLICY_NAMES, make_policy


def test_names() -> None:
    assert POLICY_NAMES[0] == "cache-aware"
    assert set(BASELINE_NAMES) == {"random", "round-robin", "pow2", "char-tree", "sglang", "llmd"}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_name_builds_a_working_policy(name: str) -> None:
    policy = make_policy(name, block_size=16, seed=3)
    assert isinstance(policy, RoutingPolicy)
    assert policy.name == name
    replicas = [ReplicaView(f"r{i}", kv_capacity_blocks=100) for i in range(3)]
    toks = list(range(200))
    request = RouteRequest("q", len(toks), chain_block_hashes(toks, 16), text="hello " * 30)
    decision = policy.choose(request, replicas)
    assert decision.replica_id in {"r0", "r1", "r2"}
    policy.on_finished(request, decision.replica_id, chain_block_hashes(toks + list(range(64)), 16))
    policy.on_replicas_changed(["r1", "r2"])
    assert policy.choose(request, replicas[1:]).replica_id in {"r1", "r2"}


def test_unknown_name_and_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("nope", block_size=16)
    with pytest.raises(ValueError, match="valid options"):
        make_policy("cache-aware", block_size=16, prefil_tokens_per_s=1.0)
    with pytest.raises(ValueError):
        make_policy("pow2", block_size=0)


def test_options_reach_the_policy() -> None:
    policy = make_policy("cache-aware", block_size=32, prefill_tokens_per_s=12000.0, balance_abs=4)
    assert policy.block_size == 32  # type: ignore[attr-defined]
    assert policy.prefill_tokens_per_s == 12000.0  # type: ignore[attr-defined]
    assert policy.balance_abs == 4  # type: ignore[attr-defined]
