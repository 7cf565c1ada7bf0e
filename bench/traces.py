"""Request traces for the simulator and the replay: readers, rate scaling, a synthetic
multi-turn generator, and the request model they all produce.

A request carries its prompt as a list of block ids in the trace's block unit
(`Trace.block_size` tokens, 512 for Mooncake): equal ids at equal positions mean equal
content. The last prompt block may be partial. `chain_block_ids` turns the ids into
chained hashes (block i's hash covers blocks 0..i), the form the routing policies and
the simulator's prefix cache use, so a repeated id after a different prefix never
counts as a hit.

`output_block_ids` optionally names the full blocks that prompt + reply form beyond the
prompt's full blocks (what an engine caches once the reply is generated). The synthetic
generator sets them, so a conversation's next turn (previous prompt + reply + new user
tokens) can hit the previous reply's blocks; Mooncake and Azure traces do not know them,
but `infer_reply_blocks` reads them off a later turn that contains the reply.
"""

from __future__ import annotations

import csv
import json
import math
import random
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_SIZE = 512


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace."""

    request_id: str
    arrival_s: float  # from the start of the trace
    prompt_tokens: int
    output_tokens: int
    block_ids: tuple[int, ...]  # ceil(prompt_tokens / block_size) ids; the last may be partial
    output_block_ids: tuple[int, ...] = ()
    session_id: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def chain_block_ids(ids: Iterable[int], seed: int = 0) -> list[int]:
    """Chained hashes of a block-id sequence: element i identifies blocks 0..i.

    Python's hash of an int tuple is not salted (PYTHONHASHSEED only salts str/bytes), so
    the chain is identical in every process and run."""
    out: list[int] = []
    h = seed
    for block_id in ids:
        h = hash((h, block_id))
        out.append(h)
    return out


@dataclass
class TraceStats:
    """What a trace offers a cache, independent of any router or cache size."""

    requests: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    prompt_blocks: int
    unique_blocks: int
    # Perfect reuse with an infinite cache: fraction of prompt blocks (and of prompt
    # tokens) already seen in an earlier request's prompt or cached reply.
    block_hit_ceiling: float
    token_hit_ceiling: float

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class Trace:
    name: str
    block_size: int
    requests: list[TraceRequest]
    has_prefix_info: bool = True
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    def scaled(self, rate_scale: float) -> Trace:
        """The same requests arriving `rate_scale` times as fast (2.0 halves the gaps)."""
        if rate_scale <= 0:
            raise ValueError(f"rate scale must be > 0, got {rate_scale}")
        reqs = [replace(r, arrival_s=r.arrival_s / rate_scale) for r in self.requests]
        return Trace(f"{self.name}@x{rate_scale:g}", self.block_size, reqs, self.has_prefix_info, dict(self.meta))

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.block_size, self.requests[:n], self.has_prefix_info, dict(self.meta))

    def _reuse_blocks(self) -> list[int]:
        """Per request: how many leading blocks of its chained prompt hashes were seen
        earlier in the trace (an earlier prompt, or a reply cached under
        `output_block_ids`), as an infinite cache shared by every replica would hold them."""
        B = self.block_size
        seen: set[int] = set()
        out: list[int] = []
        for r in self.requests:
            chain = chain_block_ids(r.block_ids)
            matched = 0
            for h in chain:
                if h not in seen:
                    break
                matched += 1
            seen.update(chain)
            if r.output_block_ids:
                seen.update(chain_block_ids(r.output_block_ids, output_chain_seed(chain, r.prompt_tokens, B)))
            out.append(matched)
        return out

    def _reuse_tokens(self, reused: list[int]) -> list[int]:
        """`_reuse_blocks` in prompt tokens (a partial last block counts its own tokens)."""
        return [min(m * self.block_size, r.prompt_tokens) for r, m in zip(self.requests, reused, strict=True)]

    def perfect_reuse_tokens(self) -> list[int]:
        """Per request: the prompt tokens of its longest prefix seen earlier in the trace
        (`_reuse_blocks`)."""
        return self._reuse_tokens(self._reuse_blocks())

    def stats(self) -> TraceStats:
        reused = self._reuse_blocks()
        blocks = sum(len(r.block_ids) for r in self.requests)
        hit_blocks = sum(reused)
        hit_tokens = sum(self._reuse_tokens(reused))
        prompt = sum(r.prompt_tokens for r in self.requests)
        return TraceStats(
            requests=len(self.requests),
            duration_s=self.duration_s,
            prompt_tokens=prompt,
            output_tokens=sum(r.output_tokens for r in self.requests),
            prompt_blocks=blocks,
            unique_blocks=blocks - hit_blocks,
            block_hit_ceiling=hit_blocks / blocks if blocks else 0.0,
            token_hit_ceiling=hit_tokens / prompt if prompt else 0.0,
        )


def output_chain_seed(prompt_chain: Sequence[int], prompt_tokens: int, block_size: int) -> int:
    """The chain value the output blocks continue from: the hash of the prompt's last
    full block (a partial last prompt block is rewritten by the reply)."""
    full = prompt_tokens // block_size
    return prompt_chain[full - 1] if full else 0


def infer_reply_blocks(trace: Trace, max_candidates: int = 64) -> tuple[Trace, int]:
    """Name the reply blocks of requests whose conversation continues later in the trace.

    vLLM caches a finished request's generated tokens too (its blocks fill and are hashed
    as it decodes), so a follow-up turn (previous prompt + reply + new user tokens) hits
    the previous reply where it lands on the same replica. A Mooncake-style trace has no
    output block ids, but the follow-up's own prompt holds them: for a request with F >= 1
    full prompt blocks, the earliest later request whose first F ids are the same and whose
    prompt holds at least this prompt + reply carries, at positions F .. (prompt +
    output) // block_size - 1, exactly the blocks this request's prompt + reply fill.
    Requests that already name output blocks, or have no such follow-up, are left alone.
    Returns the trace and how many requests got reply blocks."""
    bs = trace.block_size
    reqs = trace.requests
    chains = [chain_block_ids(r.block_ids) for r in reqs]
    # Chained hash of a block -> requests holding it as a full prompt block, in trace order.
    holders: dict[int, list[int]] = {}
    for i, (r, chain) in enumerate(zip(reqs, chains, strict=True)):
        for h in chain[: r.prompt_tokens // bs]:
            holders.setdefault(h, []).append(i)
    out: list[TraceRequest] = []
    found = 0
    for i, (r, chain) in enumerate(zip(reqs, chains, strict=True)):
        full = r.prompt_tokens // bs
        upto = (r.prompt_tokens + r.output_tokens) // bs
        if r.output_block_ids or full == 0 or upto <= full:
            out.append(r)
            continue
        later = holders.get(chain[full - 1], [])
        k = bisect_right(later, i)
        ids: tuple[int, ...] = ()
        for j in later[k : k + max_candidates]:
            follow = reqs[j]
            if follow.arrival_s >= r.arrival_s and follow.prompt_tokens >= r.prompt_tokens + r.output_tokens:
                ids = follow.block_ids[full:upto]
                break
        if ids:
            found += 1
            out.append(replace(r, output_block_ids=ids))
        else:
            out.append(r)
    meta = {**trace.meta, "reply_blocks": f"inferred for {found} requests"}
    return Trace(trace.name, bs, out, trace.has_prefix_info, meta), found


def _unique_ids(start: int, count: int) -> tuple[int, ...]:
    return tuple(range(start, start + count))


def read_mooncake(path: str | Path, limit: int | None = None) -> Trace:
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512-token blocks)."""
    reqs: list[TraceRequest] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = int(row["input_length"])
                ids = tuple(int(h) for h in row["hash_ids"])
                arrival = float(row["timestamp"]) / 1000.0
                output = max(1, int(row["output_length"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace row ({e!r})") from e
            if len(ids) != math.ceil(prompt / MOONCAKE_BLOCK_SIZE):
                raise ValueError(
                    f"{path}:{lineno}: {len(ids)} hash_ids for {prompt} tokens "
                    f"(expected ceil({prompt}/{MOONCAKE_BLOCK_SIZE}))"
                )
            reqs.append(TraceRequest(f"r{len(reqs)}", arrival, prompt, output, ids))
            if limit is not None and len(reqs) >= limit:
                break
    reqs.sort(key=lambda r: r.arrival_s)
    return Trace(Path(path).stem, MOONCAKE_BLOCK_SIZE, _rebase(reqs), True, {"format": "mooncake", "path": str(path)})


def _parse_azure_time(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than %f takes.
    text = text.strip()
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()


def read_azure(path: str | Path, block_size: int = MOONCAKE_BLOCK_SIZE, limit: int | None = None) -> Trace:
    """Azure LLM inference CSV: TIMESTAMP, ContextTokens, GeneratedTokens. No prefix
    information: every block gets a fresh id, so no cache hits are possible."""
    reqs: list[TraceRequest] = []
    next_id = 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not an Azure trace, missing columns {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            try:
                t = _parse_azure_time(row["TIMESTAMP"])
                prompt = max(1, int(row["ContextTokens"]))
                output = max(1, int(row["GeneratedTokens"]))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad row ({e!r})") from e
            n = math.ceil(prompt / block_size)
            reqs.append(TraceRequest(f"r{len(reqs)}", t, prompt, output, _unique_ids(next_id, n)))
            next_id += n
            if limit is not None and len(reqs) >= limit:
                break
    reqs.sort(key=lambda r: r.arrival_s)
    return Trace(Path(path).stem, block_size, _rebase(reqs), False, {"format": "azure", "path": str(path)})


def _rebase(reqs: list[TraceRequest]) -> list[TraceRequest]:
    if not reqs:
        return reqs
    t0 = reqs[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - t0) for r in reqs] if t0 else reqs


def read_trace(path: str | Path, limit: int | None = None, block_size: int = MOONCAKE_BLOCK_SIZE) -> Trace:
    """Read a trace by its content: Mooncake JSONL or Azure CSV."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"trace not found: {p}")
    with open(p) as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return read_mooncake(p, limit)
    if "TIMESTAMP" in first and "ContextTokens" in first:
        return read_azure(p, block_size, limit)
    raise ValueError(f"{p}: unknown trace format (expected Mooncake JSONL or Azure CSV), first line {first[:80]!r}")


@dataclass(frozen=True)
class SyntheticSpec:
    """A multi-turn chat workload with shared system prompts.

    Conversations start as a renewal process with gamma inter-arrival times of shape
    `arrival_shape` (1: Poisson; below 1 bursty, the gaps' coefficient of variation is
    1 / sqrt(shape)); each picks one of `system_prompts` shared
    prompts, then alternates user turns and replies. Turn k+1's prompt is turn k's prompt
    + reply + new user tokens, arriving `think_s` (exponential) after turn k."""

    conversations: int = 200
    conversation_rate_per_s: float = 1.0
    arrival_shape: float = 1.0
    mean_turns: float = 4.0
    max_turns: int = 16
    system_prompts: int = 4
    system_prompt_tokens: int = 2048
    mean_user_tokens: int = 400
    mean_output_tokens: int = 250
    mean_think_s: float = 20.0
    block_size: int = MOONCAKE_BLOCK_SIZE
    max_prompt_tokens: int | None = None  # stop a conversation before it outgrows this
    seed: int = 0


def synthetic_multiturn(spec: SyntheticSpec) -> Trace:
    rng = random.Random(spec.seed)
    bs = spec.block_size
    next_id = 0

    def fresh() -> int:
        nonlocal next_id
        next_id += 1
        return next_id

    # A block fully inside system prompt s keeps the same id in every conversation.
    system_ids = [[fresh() for _ in range(spec.system_prompt_tokens // bs)] for _ in range(spec.system_prompts)]
    reqs: list[TraceRequest] = []
    start = 0.0
    for c in range(spec.conversations):
        if spec.arrival_shape == 1.0:
            start += rng.expovariate(spec.conversation_rate_per_s)
        else:
            start += rng.gammavariate(spec.arrival_shape, 1.0 / (spec.conversation_rate_per_s * spec.arrival_shape))
        system = rng.randrange(spec.system_prompts)
        stream_ids: list[int] = list(system_ids[system])  # ids of the conversation's full blocks so far

        turns = min(spec.max_turns, 1 + int(rng.expovariate(1.0 / max(spec.mean_turns - 1, 1e-9))))
        context = spec.system_prompt_tokens
        t = start
        for turn in range(turns):
            prompt = context + max(1, int(rng.expovariate(1.0 / spec.mean_user_tokens)))
            output = max(1, int(rng.expovariate(1.0 / spec.mean_output_tokens)))
            if spec.max_prompt_tokens is not None and prompt + output > spec.max_prompt_tokens:
                break
            full = prompt // bs
            while len(stream_ids) < (prompt + output) // bs:
                stream_ids.append(fresh())
            ids = stream_ids[:full]
            if prompt % bs:
                ids.append(fresh())  # partial block: its content is only a prefix of stream block `full`
            out_ids = tuple(stream_ids[full : (prompt + output) // bs])
            reqs.append(TraceRequest(f"c{c}t{turn}", t, prompt, output, tuple(ids), out_ids, session_id=f"c{c}"))
            context = prompt + output
            t += rng.expovariate(1.0 / spec.mean_think_s)
    reqs.sort(key=lambda r: (r.arrival_s, r.request_id))
    meta = {"format": "synthetic", "spec": json.dumps(spec.__dict__)}
    return Trace("synthetic-multiturn", bs, _rebase(reqs), True, meta)
