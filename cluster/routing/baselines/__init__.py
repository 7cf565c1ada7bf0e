"""Peer routing policies behind our `RoutingPolicy` interface, for side-by-side runs.

Each mirrors a published router's decision rule as closely as the interface allows:
random, round-robin, power-of-two choices (Ray Serve's default), a character prefix
tree (Ray's PrefixCacheAffinityRouter), SGLang's cache-aware router and llm-d's weighted
scorer. Like their originals they index only what they route (prompts), not replies.
"""

from cluster.routing.baselines.char_tree import CharTreePolicy
from cluster.routing.baselines.llmd import LlmdScorerPolicy
from cluster.routing.baselines.pow2 import PowerOfTwoPolicy
from cluster.routing.baselines.random_choice import RandomPolicy
from cluster.routing.baselines.round_robin import RoundRobinPolicy
from cluster.routing.baselines.sglang import SglangCacheAwarePolicy

__all__ = [
    "CharTreePolicy",
    "LlmdScorerPolicy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SglangCacheAwarePolicy",
]
