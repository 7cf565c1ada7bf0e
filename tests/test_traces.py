"""Trace readers, rate scaling, the synthetic generator and the reuse ceiling, on tiny
traces written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.traces import (
    SyntheticSpec,
    Trace,
    TraceRequest,
    chain_block_ids,
    output_chain_seed,
    read_azure,
    read_mooncake,
    read_trace,
    synthetic_multiturn,
)


def _write_mooncake(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MOONCAKE_ROWS = [
    {"timestamp": 1000, "input_length": 1100, "output_length": 10, "hash_ids": [0, 1, 2]},
    {"timestamp": 1500, "input_length": 600, "output_length": 0, "hash_ids": [0, 3]},
    {"timestamp": 4000, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]},
]


def test_mooncake_reader(tmp_path: Path) -> None:
    trace = read_trace(_write_mooncake(tmp_path / "m.jsonl", MOONCAKE_ROWS))
    assert trace.block_size == 512
    assert [r.arrival_s for r in trace.requests] == [0.0, 0.5, 3.0]  # ms -> s, rebased to 0
    assert [r.prompt_tokens for r in trace.requests] == [1100, 600, 1024]
    assert trace.requests[1].output_tokens == 1  # a request always yields one token
    assert trace.requests[0].block_ids == (0, 1, 2)
    assert trace.duration_s == 3.0


def test_mooncake_reader_refuses_inconsistent_blocks(tmp_path: Path) -> None:
    bad = [{"timestamp": 0, "input_length": 2000, "output_length": 5, "hash_ids": [0, 1]}]
    with pytest.raises(ValueError, match="expected ceil"):
        read_mooncake(_write_mooncake(tmp_path / "bad.jsonl", bad))


def test_azure_reader(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,1030,109\n"
    )
    trace = read_azure(path, block_size=512)
    assert len(trace) == 2
    assert trace.requests[0].arrival_s == 0.0
    assert trace.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-5)
    assert len(trace.requests[1].block_ids) == 3
    assert not trace.has_prefix_info
    # Fresh ids everywhere: nothing can be reused.
    assert trace.stats().block_hit_ceiling == 0.0
    assert read_trace(path).requests[1].prompt_tokens == 1030


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        read_trace(path)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.jsonl")


def test_rate_scaling(tmp_path: Path) -> None:
    trace = read_trace(_write_mooncake(tmp_path / "m.jsonl", MOONCAKE_ROWS))
    fast = trace.scaled(2.0)
    assert [r.arrival_s for r in fast.requests] == [0.0, 0.25, 1.5]
    assert [r.prompt_tokens for r in fast.requests] == [r.prompt_tokens for r in trace.requests]
    with pytest.raises(ValueError):
        trace.scaled(0)


def test_ceiling_counts_chained_repeats(tmp_path: Path) -> None:
    trace = read_trace(_write_mooncake(tmp_path / "m.jsonl", MOONCAKE_ROWS))
    stats = trace.stats()
    # Blocks: [0,1,2] [0,3] [0,1]: repeats are 0 (twice) and the chain 0,1 once = 3 of 7.
    assert stats.prompt_blocks == 7
    assert stats.block_hit_ceiling == pytest.approx(3 / 7)
    # Tokens: 512 + 512 + 512 of 2724 prompt tokens.
    assert stats.token_hit_ceiling == pytest.approx(1536 / 2724)


def test_chain_depends_on_prefix() -> None:
    a = chain_block_ids([1, 2, 3])
    b = chain_block_ids([9, 2, 3])
    assert a[0] != b[0] and a[1] != b[1]  # same id after a different prefix is different content
    assert chain_block_ids([1, 2, 3]) == a  # deterministic


def test_synthetic_next_turn_extends_previous() -> None:
    spec = SyntheticSpec(conversations=20, mean_turns=4, block_size=16, system_prompt_tokens=64, seed=3)
    trace = synthetic_multiturn(spec)
    assert synthetic_multiturn(spec).requests == trace.requests  # seeded
    by_session: dict[str, list[TraceRequest]] = {}
    for r in trace.requests:
        by_session.setdefault(r.session_id or "", []).append(r)
    checked = 0
    bs = spec.block_size
    for turns in by_session.values():
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.arrival_s > prev.arrival_s
            assert nxt.prompt_tokens > prev.prompt_tokens + prev.output_tokens
            prev_chain = chain_block_ids(prev.block_ids)
            cached = prev_chain[: prev.prompt_tokens // bs] + chain_block_ids(
                prev.output_block_ids, output_chain_seed(prev_chain, prev.prompt_tokens, bs)
            )
            nxt_chain = chain_block_ids(nxt.block_ids)
            # Every full block of prompt + reply reappears at the start of the next turn.
            assert len(cached) == (prev.prompt_tokens + prev.output_tokens) // bs
            assert nxt_chain[: len(cached)] == cached
            checked += 1
    assert checked > 10
    # Conversations sharing a system prompt share its blocks.
    firsts = {chain_block_ids(t[0].block_ids)[0] for t in by_session.values()}
    assert len(firsts) <= spec.system_prompts
    assert trace.stats().block_hit_ceiling > 0.3


def test_head_and_scaled_keep_block_size() -> None:
    reqs = [TraceRequest("a", 0.0, 10, 2, (1,)), TraceRequest("b", 2.0, 10, 2, (1,))]
    trace = Trace("t", 16, reqs)
    assert trace.head(1).requests == reqs[:1]
    assert trace.scaled(4).block_size == 16


def test_scaled_down_replay_trace_keeps_block_structure(tmp_path: Path) -> None:
    from bench.live.replay_cluster import prompt_token_ids, scale_trace

    trace = read_trace(_write_mooncake(tmp_path / "m.jsonl", MOONCAKE_ROWS))
    small = scale_trace(trace, 1 / 32, rate_scale=2.0, max_output=3)
    assert small.block_size == 16
    # 1100 tokens = 2 full blocks + 76 -> 2 x 16 + ceil(76/32) = 35; 600 -> 16 + 3; 1024 -> 2 x 16.
    assert [r.prompt_tokens for r in small.requests] == [35, 19, 32]
    assert [r.output_tokens for r in small.requests] == [1, 1, 1]
    assert [r.arrival_s for r in small.requests] == [0.0, 0.25, 1.5]
    assert small.stats().block_hit_ceiling == trace.stats().block_hit_ceiling
    a, b, c = (prompt_token_ids(r, 16, 32768) for r in small.requests)
    assert len(a) == 35 and len(b) == 19
    assert a[:16] == b[:16]  # block id 0 -> the same tokens
    assert a[:32] == c  # ids 0, 1 -> the same two blocks
    assert a[16:32] != b[16:32]
    assert min(a) >= 1000 and max(a) < 32768  # clear of special tokens, inside the vocabulary


def test_replay_trace_outputs_scale_apart_from_tokens(tmp_path: Path) -> None:
    from bench.live.replay_cluster import scale_trace

    trace = read_trace(_write_mooncake(tmp_path / "m.jsonl", MOONCAKE_ROWS))
    # Outputs 10, 0, 5 at half scale -> 5, 0, 3; the floor of 2 lifts the zero, prompts as at 1/32.
    longer = scale_trace(trace, 1 / 32, output_scale=0.5, min_output=2, max_output=4)
    assert [r.output_tokens for r in longer.requests] == [4, 2, 3]
    assert [r.prompt_tokens for r in longer.requests] == [35, 19, 32]
    with pytest.raises(ValueError, match="output scale"):
        scale_trace(trace, 1 / 32, output_scale=2.0)
    with pytest.raises(ValueError, match="min_output"):
        scale_trace(trace, 1 / 32, min_output=5, max_output=4)


def test_a_disjoint_twin_has_the_same_shape_and_no_shared_block(tmp_path: Path) -> None:
    from bench.live.replay_cluster import disjoint_twin, prompt_token_ids, scale_trace

    trace = scale_trace(read_trace(_write_mooncake(tmp_path / "m.jsonl", MOONCAKE_ROWS)), 1 / 32, max_output=3)
    twin = disjoint_twin(trace)
    shape = [(r.arrival_s, r.prompt_tokens, r.output_tokens, len(r.block_ids)) for r in trace.requests]
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, len(r.block_ids)) for r in twin.requests] == shape
    # Its own prefixes repeat as the trace's do, and none is one of the trace's.
    assert twin.stats().block_hit_ceiling == trace.stats().block_hit_ceiling > 0
    assert not {b for r in twin.requests for b in r.block_ids} & {b for r in trace.requests for b in r.block_ids}
    first, twin_first = prompt_token_ids(trace.requests[0], 16, 32768), prompt_token_ids(twin.requests[0], 16, 32768)
    assert len(first) == len(twin_first) and first[:16] != twin_first[:16]
    assert {r.request_id for r in twin.requests}.isdisjoint(r.request_id for r in trace.requests)


def test_prometheus_counters_of_vllm() -> None:
    from bench.live.prefix_counters import prometheus_sum

    text = "\n".join(
        [
            "# HELP ray_vllm_prefix_cache_queries_total Prefix cache queries",
            "# TYPE ray_vllm_prefix_cache_queries_total counter",
            'ray_vllm_prefix_cache_queries_total{engine="0",ReplicaId="a"} 1200.0',
            'ray_vllm_prefix_cache_queries_total{engine="0",ReplicaId="b"} 800.0',
            'ray_vllm_prefix_cache_hits_total{engine="0",ReplicaId="a"} 512.0',
            'ray_vllm_external_prefix_cache_queries_total{engine="0"} 99.0',
            "vllm:prefix_cache_hits_total 7",
        ]
    )
    assert prometheus_sum(text, "vllm:prefix_cache_queries") == 2000.0
    assert prometheus_sum(text, "vllm:prefix_cache_hits") == 519.0
    assert prometheus_sum(text, "vllm:num_requests_running") is None
