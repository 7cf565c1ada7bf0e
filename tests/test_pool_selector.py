"""PoolSelector: smallest fitting pool, spill when saturated, refusal beyond the largest."""

from __future__ import annotations

import pytest

from cluster.config import EngineArgs, PoolConfig
from cluster.routing.pool_selector import ContextTooLong, PoolLoad, PoolSelector


def _pool(name: str, max_model_len: int, *, seqs: int = 4, spill: bool = True) -> PoolConfig:
    return PoolConfig(
        name=name, max_model_len=max_model_len, accepts_spill=spill, engine=EngineArgs(max_num_seqs=seqs, block_size=32)
    )


POOLS = [_pool("long", 131_072, seqs=2), _pool("short", 8_192), _pool("standard", 32_768)]


def test_smallest_fitting_pool_wins() -> None:
    sel = PoolSelector(POOLS)  # order given does not matter
    assert sel.select(100, 100).pool == "short"
    assert sel.select(8_000, 192).pool == "short"  # exactly 8,192: fits
    assert sel.select(8_000, 193).pool == "standard"  # one more: next pool
    assert sel.select(40_000, 1_000).pool == "long"
    assert sel.max_context == 131_072


def test_without_max_tokens_one_token_of_room_is_needed() -> None:
    sel = PoolSelector(POOLS)
    assert sel.select(8_191, None).pool == "short"
    assert sel.select(8_192, None).pool == "standard"


def test_beyond_the_largest_pool_carries_both_numbers() -> None:
    sel = PoolSelector(POOLS)
    with pytest.raises(ContextTooLong) as info:
        sel.select(130_000, 2_000)
    err = info.value
    assert (err.requested, err.limit, err.prompt_tokens, err.max_tokens) == (132_000, 131_072, 130_000, 2_000)
    assert "132000" in str(err) and "131072" in str(err)


def test_saturation_rule_is_replicas_times_max_num_seqs() -> None:
    sel = PoolSelector(POOLS)
    short = POOLS[1]
    assert not sel.is_saturated(short, PoolLoad(in_flight=7, replicas=2))  # 2 x 4 = 8
    assert sel.is_saturated(short, PoolLoad(in_flight=8, replicas=2))
    assert sel.is_saturated(short, PoolLoad(in_flight=0, replicas=0))  # no replica running


def test_spill_to_the_next_larger_pool_when_saturated() -> None:
    sel = PoolSelector(POOLS)
    loads = {"short": PoolLoad(in_flight=8, replicas=2), "standard": PoolLoad(in_flight=0, replicas=1)}
    choice = sel.select(100, 100, loads)
    assert (choice.pool, choice.spilled_from) == ("standard", "short")
    assert sel.select(100, 100, {"short": PoolLoad(in_flight=7, replicas=2)}).spilled_from is None


def test_spill_skips_saturated_and_non_accepting_pools() -> None:
    pools = [_pool("short", 8_192), _pool("standard", 32_768, spill=False), _pool("long", 131_072, seqs=2)]
    sel = PoolSelector(pools)
    loads = {"short": PoolLoad(in_flight=4, replicas=1)}
    assert sel.select(100, 100, loads).pool == "long"  # standard refuses spill
    loads["long"] = PoolLoad(in_flight=2, replicas=1)
    choice = sel.select(100, 100, loads)
    assert (choice.pool, choice.spilled_from) == ("short", None)  # all saturated: queue where it fits best


def test_a_smaller_pool_is_never_a_candidate() -> None:
    sel = PoolSelector(POOLS)
    loads = {"standard": PoolLoad(in_flight=99, replicas=1), "long": PoolLoad(in_flight=99, replicas=1)}
    assert sel.select(20_000, 100, loads).pool == "standard"


def test_needs_a_pool() -> None:
    with pytest.raises(ValueError):
        PoolSelector([])
