"""Chained hashes of token blocks, at the engine's KV block granularity.

vLLM caches KV per block of `block_size` tokens and finds a cached block by a hash that
covers the block's tokens *and its parent's hash*, so a block hit implies the whole
prefix before it is cached too. Routers hash prompts the same way: block i's hash covers
blocks 0..i, and a replica's longest cached prefix is the longest run of leading hashes
it holds. Only full blocks count; the engine never caches a partial tail block.

Hash choice: CPython's tuple hash over ints is a few times cheaper than blake2b over
packed bytes (`cluster bench router` prints the cost of hashing prompts). Tuple hashing
of ints is deterministic across processes (PYTHONHASHSEED only salts str/bytes), so
every router and the simulator agree. Hashes are masked to 60 bits so each one is a 32-byte Python int in the index
rather than a 40-byte one; 60 bits keep collisions negligible at billions of blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_BITS = 60
_MASK = (1 << HASH_BITS) - 1
# The parent of block 0; any constant works as long as every router uses the same one.
ROOT_HASH = 0


def chain_block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of the full blocks of `token_ids`; hash i covers tokens [0, (i+1)*block_size).

    `parent` continues an existing chain: pass the last hash of the prompt to hash the
    generated tokens that follow it (their token_ids must start at a block boundary).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = token_ids if isinstance(token_ids, (list, tuple)) else list(token_ids)
    end = len(tokens) - len(tokens) % block_size
    out: list[int] = []
    h = parent
    for start in range(0, end, block_size):
        h = hash((h, tuple(tokens[start : start + block_size]))) & _MASK
        out.append(h)
    return out


def salt_root(cache_salt: str | None) -> int:
    """The parent of block 0 for requests with a cache salt: vLLM mixes the salt into
    block 0's hash, so chains of different salts never meet, here as in the engine."""
    if not cache_salt:
        return ROOT_HASH
    return int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little") & _MASK


def extend_chain(
    block_hashes: Sequence[int], token_ids: Sequence[int], block_size: int, root: int = ROOT_HASH
) -> list[int]:
    """The chain of `token_ids` where its first `len(block_hashes)` blocks are already
    hashed (`block_hashes`): hashes only the new full blocks, e.g. a reply appended to a
    prompt. Returns the whole chain (`root`: block 0's parent, see salt_root)."""
    done = len(block_hashes)
    parent = block_hashes[-1] if done else root
    return list(block_hashes) + chain_block_hashes(token_ids[done * block_size :], block_size, parent)


def text_pseudo_tokens(text: str) -> list[int]:
    """Stand-in token ids for a prompt the router only has as text (no gateway hint):
    4 UTF-8 bytes per pseudo-token, close to a real tokenizer's ~4 characters per token,
    so blocks span about as much text as the engine's blocks do. Only comparable with
    other pseudo-token chains, never with real token ids."""
    data = text.encode("utf-8", "surrogatepass")
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]


__all__ = ["HASH_BITS", "ROOT_HASH", "chain_block_hashes", "extend_chain", "salt_root", "text_pseudo_tokens"]
