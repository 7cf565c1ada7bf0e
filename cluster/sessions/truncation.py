"""The truncation rule of a session's stored history.

Caps: `max_turns` turns and `max_tokens` tokens (system prompt included). A turn is what
one request added: its new messages (user message, tool results) plus the assistant
reply (with its tool calls).

Rule, applied atomically by the commit script (cluster.sessions.scripts) right after a
turn is appended:

1. While both caps hold, nothing is dropped: the history only grows at its end, so each
   request's prompt extends the previous one and the engine's prefix cache keeps hitting.
2. When a commit breaks a cap, the oldest *whole* turns are dropped until the history is
   at most `keep_fraction` of both caps (default 0.75); the turn just committed is never
   dropped. Dropping in one chunk down to a low-water mark, not one turn per request,
   means the new prefix then stays identical for the many turns it takes to refill the
   headroom: one cache miss per chunk instead of one per request.
3. The cut then moves forward to the next turn that starts with a user message, if there
   is one, so a kept tool result never loses the assistant tool call it answers.
4. The system prompt is never dropped (it is stored apart from the turns).

`plan_drop` is the reference implementation; the Lua script mirrors it and the tests
check both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TruncationPolicy:
    max_turns: int
    max_tokens: int
    keep_fraction: float = 0.75

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_tokens < 1:
            raise ValueError("max_turns and max_tokens must be >= 1")
        if not 0 < self.keep_fraction < 1:
            raise ValueError("keep_fraction must be in (0, 1)")

    @property
    def target_turns(self) -> int:
        return max(1, math.floor(self.max_turns * self.keep_fraction))

    @property
    def target_tokens(self) -> int:
        return math.floor(self.max_tokens * self.keep_fraction)


@dataclass(frozen=True)
class TurnShape:
    tokens: int
    starts_with_user: bool


def plan_drop(turns: Sequence[TurnShape], system_tokens: int, policy: TruncationPolicy) -> int:
    """How many of the oldest `turns` to drop (the newest is last and always kept)."""
    n = len(turns)
    total = system_tokens + sum(t.tokens for t in turns)
    if n <= policy.max_turns and total <= policy.max_tokens:
        return 0
    drop = 0
    while drop < n - 1 and (n - drop > policy.target_turns or total > policy.target_tokens):
        total -= turns[drop].tokens
        drop += 1
    cut = drop
    while cut < n - 1 and not turns[cut].starts_with_user:
        cut += 1
    return cut if turns[cut].starts_with_user else drop


__all__ = ["TruncationPolicy", "TurnShape", "plan_drop"]
