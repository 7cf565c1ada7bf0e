"""Chained block hashes: prefix sharing, chain dependence, stability across processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.routing.block_hash import chain_block_hashes, extend_chain, text_pseudo_tokens

B = 4


def test_only_full_blocks_are_hashed() -> None:
    assert len(chain_block_hashes(list(range(11)), B)) == 2
    assert chain_block_hashes(list(range(3)), B) == []


def test_shared_prefix_shares_hashes_until_divergence() -> None:
    a = chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], B)
    b = chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 0, 10, 11, 12], B)
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_block_hash_covers_all_earlier_blocks() -> None:
    a = chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], B)
    b = chain_block_hashes([9, 2, 3, 4, 5, 6, 7, 8], B)
    # Same tokens in block 1, different block 0: block 1's hash differs too.
    assert a[0] != b[0] and a[1] != b[1]
    assert all(0 <= h < 2**60 for h in a + b)


def test_extend_chain_matches_hashing_everything() -> None:
    prompt = list(range(10))
    held = prompt + list(range(100, 113))
    assert extend_chain(chain_block_hashes(prompt, B), held, B) == chain_block_hashes(held, B)


def test_invalid_block_size() -> None:
    with pytest.raises(ValueError):
        chain_block_hashes([1, 2, 3], 0)


def test_hashes_are_identical_in_another_process_with_another_hash_seed() -> None:
    tokens = list(range(1000, 1064))
    code = (
        "from cluster.routing.block_hash import chain_block_hashes;"
        f"print(chain_block_hashes(list(range(1000, 1064)), {B}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(chain_block_hashes(tokens, B))


def test_text_pseudo_tokens_share_prefixes() -> None:
    a = text_pseudo_tokens("You are a helpful assistant. Question one is about block hashing")
    b = text_pseudo_tokens("You are a helpful assistant. Question two is about prefix caching")
    assert chain_block_hashes(a, B)[:2] == chain_block_hashes(b, B)[:2]
    assert chain_block_hashes(a, B) != chain_block_hashes(b, B)
