"""Baseline: a prefix tree of prompt characters, like Ray's PrefixCacheAffinityRouter.

Ray's rule (ray.llm ... prefix_aware_router.py, prefix_tree.py), reproduced:
1. If the load is imbalanced (highest minus lowest queue length above
   `imbalanced_threshold`), fall back to power of two choices.
2. Otherwise match the prompt text against one shared radix tree whose nodes record
   which replicas ("tenants") were sent that text. If the matched share of the prompt is
   at least `match_rate_threshold` (0.1), the candidates are the replicas owning the
   deepest matched node; below it, the replicas with the fewest characters in the tree.
   The least-loaded candidate wins.
3. The routed prompt is inserted for the chosen replica (prompts only; Ray does not see
   replies, and by default it never evicts).

Ray's own default `imbalanced_threshold` is infinity (never falls back); we default to
20, the value in Ray Serve's RequestRouterConfig documentation example, which is the
stronger baseline. The tree matches the request's text where known; the simulator
(no text) matches the sequence of block hashes instead, one symbol per block.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from cluster.routing.baselines.pow2 import pick_pow2
from cluster.routing.policy import ReplicaView, RouteDecision, RouteRequest

Symbols = Any  # str, or tuple[int, ...] of block hashes


def _common_len(a: Symbols, b: Symbols) -> int:
    """Length of the common prefix, by C-speed slice comparisons (binary search)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    __slots__ = ("seg", "children", "tenants")

    def __init__(self, seg: Symbols, tenants: set[str]) -> None:
        self.seg = seg
        self.children: dict[Any, _Node] = {}
        self.tenants = tenants


class PrefixTree:
    """Radix tree of symbol sequences; each node knows which tenants inserted through it."""

    def __init__(self) -> None:
        self.root = _Node("", set())
        self.tenant_chars: dict[str, int] = {}

    def add_tenant(self, tenant: str) -> None:
        if tenant not in self.tenant_chars:
            self.tenant_chars[tenant] = 0
            self.root.tenants.add(tenant)

    def insert(self, seq: Symbols, tenant: str) -> None:
        self.add_tenant(tenant)
        node, i, n = self.root, 0, len(seq)
        while i < n:
            child = node.children.get(seq[i])
            if child is None:
                node.children[seq[i]] = _Node(seq[i:], {tenant})
                self.tenant_chars[tenant] += n - i
                return
            k = _common_len(child.seg, seq[i:])
            if k < len(child.seg):  # split the edge at the divergence point
                mid = _Node(child.seg[:k], set(child.tenants))
                child.seg = child.seg[k:]
                mid.children[child.seg[0]] = child
                node.children[seq[i]] = mid
                child = mid
            if tenant not in child.tenants:
                child.tenants.add(tenant)
                self.tenant_chars[tenant] += len(child.seg)
            node, i = child, i + k

    def prefix_match(self, seq: Symbols, available: Sequence[str]) -> tuple[int, list[str]]:
        """(matched length, tenants among `available` owning the deepest matched node)."""
        node, i, n = self.root, 0, len(seq)
        while i < n:
            child = node.children.get(seq[i])
            if child is None or not any(t in child.tenants for t in available):
                break
            k = _common_len(child.seg, seq[i:])
            i += k
            node = child
            if k < len(child.seg):
                break
        return i, [t for t in available if t in node.tenants]

    def remove_tenant(self, tenant: str) -> None:
        if self.tenant_chars.pop(tenant, None) is None:
            return
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.tenants.discard(tenant)
            for key, child in list(node.children.items()):
                if tenant in child.tenants:
                    child.tenants.discard(tenant)
                    if not child.tenants:
                        del node.children[key]
                        continue
                    stack.append(child)


class CharTreePolicy:
    name = "char-tree"

    def __init__(
        self,
        *,
        block_size: int = 16,
        imbalanced_threshold: float = 20,
        match_rate_threshold: float = 0.1,
        seed: int | None = None,
    ) -> None:
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.tree = PrefixTree()
        self._rng = random.Random(seed)

    def _least_loaded(self, candidates: Sequence[ReplicaView]) -> ReplicaView:
        return min(candidates, key=lambda r: (r.load, self._rng.random()))

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaView]) -> RouteDecision:
        for r in replicas:
            self.tree.add_tenant(r.replica_id)
        seq: Symbols = request.text if request.text else tuple(request.block_hashes)
        loads = [r.load for r in replicas]
        if not seq or max(loads) - min(loads) > self.imbalanced_threshold:
            chosen, reason, matched = pick_pow2(replicas, self._rng), "pow2-fallback", 0
        else:
            ids = [r.replica_id for r in replicas]
            matched, owners = self.tree.prefix_match(seq, ids)
            by_id = {r.replica_id: r for r in replicas}
            if matched / len(seq) >= self.match_rate_threshold and owners:
                chosen, reason = self._least_loaded([by_id[t] for t in owners]), "prefix-match"
            else:
                fewest = min(self.tree.tenant_chars[t] for t in ids)
                smallest = [by_id[t] for t in ids if self.tree.tenant_chars[t] == fewest]
                chosen, reason, matched = self._least_loaded(smallest), "smallest-tenant", 0
        self.tree.insert(seq, chosen.replica_id)
        blocks = len(request.block_hashes)
        matched_blocks = matched if not request.text else int(blocks * matched / max(1, len(seq)))
        return RouteDecision(replica_id=chosen.replica_id, matched_blocks=matched_blocks, reason=reason)

    def on_finished(self, request: RouteRequest, replica_id: str, output_block_hashes: Sequence[int]) -> None:
        pass  # Ray inserts prompts at routing time only

    def on_replicas_changed(self, replica_ids: Sequence[str]) -> None:
        keep = set(replica_ids)
        for tenant in [t for t in self.tree.tenant_chars if t not in keep]:
            self.tree.remove_tenant(tenant)
