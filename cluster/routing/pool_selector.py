"""Choose the engine pool of a request by context length. Pure logic, no Ray.

Pools differ by `max_model_len` (sorted ascending in ClusterConfig). A request needs
`prompt_tokens + max_tokens` positions; it goes to the smallest pool that holds that,
because a smaller pool's engines pack more sequences into the same KV memory.

Spill: when that pool is *saturated* the request goes to the next larger pool that
`accepts_spill` and is not saturated itself (a larger pool always fits a smaller
pool's requests). If every candidate is saturated it stays in the smallest fitting
pool and queues there, rather than crowding the long-context pool.

Saturation rule: a pool is saturated when its in-flight requests reach
`replicas x max_num_seqs`, i.e. every engine's running batch is full and anything
more would wait in an engine queue. The caller supplies both numbers (`PoolLoad`);
the gateway uses its live replica count and its in-flight estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.config import PoolConfig


class ContextTooLong(ValueError):
    """Prompt plus completion exceed the largest pool's max_model_len."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, limit: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit
        self.completion_tokens = completion_tokens(max_tokens)
        self.requested = prompt_tokens + self.completion_tokens
        super().__init__(
            f"requested {self.requested} tokens ({prompt_tokens} prompt + "
            f"{self.completion_tokens} completion) but the largest pool holds {limit}"
        )


def completion_tokens(max_tokens: int | None) -> int:
    """Positions a request needs for its completion: without max_tokens the engine
    generates until the context is full, so it needs room for at least one new token."""
    return max_tokens if max_tokens is not None else 1


@dataclass(frozen=True)
class PoolLoad:
    in_flight: int = 0
    replicas: int = 1


@dataclass(frozen=True)
class PoolChoice:
    pool: str
    max_model_len: int
    spilled_from: str | None = None  # the smallest fitting pool, when we spilled out of it


class PoolSelector:
    def __init__(self, pools: Sequence[PoolConfig]) -> None:
        if not pools:
            raise ValueError("PoolSelector needs at least one pool")
        self._pools = sorted(pools, key=lambda p: p.max_model_len)

    @property
    def max_context(self) -> int:
        return self._pools[-1].max_model_len

    @staticmethod
    def capacity(pool: PoolConfig, replicas: int) -> int:
        return max(0, replicas) * pool.engine.max_num_seqs

    def is_saturated(self, pool: PoolConfig, load: PoolLoad) -> bool:
        return load.in_flight >= self.capacity(pool, load.replicas)

    @property
    def pool_names(self) -> list[str]:
        return [p.name for p in self._pools]

    def fits(self, pool: PoolConfig, prompt_tokens: int, max_tokens: int | None) -> bool:
        return prompt_tokens + completion_tokens(max_tokens) <= pool.max_model_len

    def spill_candidates(self, pool: str, prompt_tokens: int, max_tokens: int | None) -> list[str]:
        """Pools larger than `pool` that accept spill and hold the request, smallest first."""
        current = next((p.max_model_len for p in self._pools if p.name == pool), 0)
        return [
            p.name
            for p in self._pools
            if p.max_model_len > current and p.accepts_spill and self.fits(p, prompt_tokens, max_tokens)
        ]

    def select(
        self,
        prompt_tokens: int,
        max_tokens: int | None,
        loads: Mapping[str, PoolLoad] | None = None,
    ) -> PoolChoice:
        """Raises ContextTooLong when no pool holds the request."""
        fitting = [p for p in self._pools if self.fits(p, prompt_tokens, max_tokens)]
        if not fitting:
            raise ContextTooLong(prompt_tokens, max_tokens, self.max_context)
        first = fitting[0]
        loads = loads or {}
        if not self.is_saturated(first, loads.get(first.name, PoolLoad())):
            return PoolChoice(first.name, first.max_model_len)
        for pool in fitting[1:]:
            if pool.accepts_spill and not self.is_saturated(pool, loads.get(pool.name, PoolLoad())):
                return PoolChoice(pool.name, pool.max_model_len, spilled_from=first.name)
        return PoolChoice(first.name, first.max_model_len)
