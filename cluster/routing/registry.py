"""Build a routing policy by name: ours ("cache-aware") and the baselines.

`make_policy(name, block_size=..., **options)`; options are the policy's keyword
arguments (`RouterConfig.options` in the cluster config), e.g.
`make_policy("cache-aware", block_size=16, prefill_tokens_per_s=12000)`.
"""

from __future__ import annotations

from typing import Any

from cluster.routing.baselines import (
    CharTreePolicy,
    LlmdScorerPolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SglangCacheAwarePolicy,
)
from cluster.routing.cache_aware import CacheAwarePolicy
from cluster.routing.policy import RoutingPolicy

_FACTORIES: dict[str, Any] = {
    "cache-aware": CacheAwarePolicy,
    "random": RandomPolicy,
    "round-robin": RoundRobinPolicy,
    "pow2": PowerOfTwoPolicy,
    "char-tree": CharTreePolicy,
    "sglang": SglangCacheAwarePolicy,
    "llmd": LlmdScorerPolicy,
}

POLICY_NAMES: list[str] = list(_FACTORIES)
BASELINE_NAMES: list[str] = [n for n in POLICY_NAMES if n != "cache-aware"]


def make_policy(name: str, *, block_size: int, **options: Any) -> RoutingPolicy:
    """A fresh policy object. Unknown names or options raise ValueError naming the valid ones."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {POLICY_NAMES}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    try:
        policy: RoutingPolicy = factory(block_size=block_size, **options)
    except TypeError as e:
        import inspect

        valid = [p for p in inspect.signature(factory).parameters if p != "block_size"]
        raise ValueError(f"bad options for routing policy {name!r}: {e}; valid options: {valid}") from e
    return policy


__all__ = ["BASELINE_NAMES", "POLICY_NAMES", "make_policy"]
