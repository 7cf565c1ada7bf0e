"""One simulated vLLM V1 engine replica: continuous batching with chunked prefill.

Each engine step follows vLLM V1's scheduler:

1. Running sequences, oldest first, each take the tokens they still need (1 when
   decoding, the rest of the prompt when prefilling) out of the step's token budget
   (`max_num_batched_tokens`). When the KV cache cannot hold a sequence's new tokens
   the newest running sequence is preempted (recompute: its blocks are released and it
   goes back to the front of the waiting queue), until the sequence fits or is itself
   the one preempted.
2. If nothing was preempted, waiting sequences are admitted first come first served
   while budget, `max_num_seqs` and KV blocks allow (the whole sequence must fit in the
   free blocks at admission, vLLM 0.29's `scheduler_reserve_full_isl`, though blocks are
   then allocated chunk by chunk): the longest resident prefix of the prompt's chained
   block hashes is reused and only the rest is prefilled, in chunks.

A sequence whose prefill completes in a step emits its first token at the end of that
step; a decoding sequence emits one token per step. Step duration comes from the step
time model (`step_ms(prefill_chunks, num_decode, decode_kv_tokens)`).

Cache granularity: one KV block here is one *trace block* (512 tokens for Mooncake),
because trace block ids are the only content identity a trace gives. KV capacity is the
profile's MemoryPlan tokens divided by that block size, and a sequence holds
ceil(kv_tokens / block_size) blocks (its reply packs into the prompt's last block), so
coarse blocks cost at most one block of capacity per running sequence. Full prompt
blocks are registered in the prefix cache when the step that computes them is scheduled,
as vLLM caches them at allocation (kv_cache_manager.py), so a request admitted later in
the same batch already shares them; at finish the
prompt's partial last block is registered under its trace id (a later identical prompt
reuses it, as vLLM reuses its 16-token sub-blocks) and the reply's full blocks under
the trace's `output_block_ids` when it has them (synthetic conversations, or inferred
from a later turn by bench.traces.infer_reply_blocks), otherwise under fresh ids that
occupy the LRU but never hit. A preempted sequence caches its reply's full blocks the
same way and resumes from every cached block of its own. A prompt found entirely in the
cache still computes its last token, as vLLM does.

Async scheduling (vLLM 0.29's default: a batch queue of two, v1/engine/core.py
step_with_batch_queue): the engine forms step k+1 while step k runs, from the state it
knew when step k was launched. So a request can join a step only if it arrived before
the previous step started (one step of admission delay), and the KV blocks and batch
slots of a request that finished in step k are free for step k+2, not k+1 (late
release). An idle engine schedules an arrival at once, as vLLM does. With
`async_scheduling=False` the model is vLLM's synchronous scheduler.

Speed: a step in which every running sequence only decodes and nothing else can change
(no admission possible, no preemption) is extended into a run of up to k steps in one
event, ending at the first finish, the first step that would need a preemption, or the
last step boundary before the simulator's next external event (`bound`). The state at
every boundary the rest of the simulator can observe is the same as step by step, and
step_ms is still called once per step with that step's exact arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from bench.sim.kv_cache import PrefixKVCache
from bench.traces import TraceRequest, chain_block_ids, output_chain_seed


class StepTime(Protocol):
    def step_ms(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_tokens: int) -> float: ...


class Seq:
    """A request inside the simulator."""

    __slots__ = (
        "index",
        "req",
        "arrival_s",
        "prompt",
        "output",
        "hashes",
        "full_blocks",
        "generated",
        "computed",
        "refs",
        "private",
        "next_reg",
        "admitted",
        "hit_blocks",
        "hit_tokens",
        "first_token_s",
        "finish_s",
        "preemptions",
        "resume",
        "reply_labels",
        "free_tokens",
        "epoch",
        "replica",
    )

    def __init__(self, index: int, req: TraceRequest, hashes: list[int], block_size: int) -> None:
        self.index = index
        self.req = req
        self.arrival_s = req.arrival_s  # at its engine (the simulator adds the serving path)
        self.prompt = req.prompt_tokens
        self.output = req.output_tokens
        self.hashes = hashes  # chained, one per prompt block (the last may be partial)
        self.full_blocks = req.prompt_tokens // block_size
        self.generated = 0
        self.computed = 0  # tokens whose KV is in the cache
        self.refs: list[int] = []  # hashed blocks this sequence references
        self.private = 0  # blocks only this sequence uses
        self.next_reg = 0  # next prompt block to register once scheduled
        self.admitted = False
        self.hit_blocks = 0
        self.hit_tokens = 0
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.preemptions = 0
        self.resume: list[int] = []  # after a preemption: chained hashes of its cached blocks
        self.reply_labels: list[int] = []  # hashes its reply blocks were cached under
        # Prompt tokens it computes for free wherever it runs (a perfect-reuse or pooled
        # cache fleet, see ClusterSimulator): its KV still takes blocks, only the prefill
        # is skipped.
        self.free_tokens = 0
        self.epoch = -1  # stats epoch it was routed in (for in-flight counts)
        self.replica = ""


class ReplicaModel:
    def __init__(
        self,
        replica_id: str,
        *,
        step_time: StepTime,
        capacity_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        fresh_id: Callable[[], int],
        decode_runs: bool = True,
        reserve_full_sequence: bool = True,
        async_scheduling: bool = True,
        contention: Callable[[ReplicaModel], float] | None = None,
        batch_stretch: float = 0.0,
    ) -> None:
        self.replica_id = replica_id
        # How much longer this replica's next step takes for engines sharing its cores
        # (the simulator's; None: it has cores of its own).
        self.contention = contention
        # ... and how much longer for each sequence beyond the first (their streams
        # share the cores; cluster.config.SimulatorConfig.engine_batch_stretch).
        self.batch_stretch = batch_stretch
        self.async_scheduling = async_scheduling
        self._late: list[Seq] = []  # finished, blocks still held until the next batch is formed
        self._last_start = 0.0  # start of the last step (of a decode run: of its last step)
        self._last_end = -1.0
        self.reserve_full_sequence = reserve_full_sequence
        self.decode_runs = decode_runs  # False: one event per step (for validation)
        self.step_time = step_time
        self.kv = PrefixKVCache(capacity_blocks)
        # A pooled cache fleet's: the longest prefix (blocks) of a chain cached on any
        # replica of this one's pool, read at admission as if transferred from there.
        self.pool_match: Callable[[Sequence[int]], int] | None = None
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._fresh_id = fresh_id
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.busy = False
        self._pending: list[tuple[Seq, int]] = []
        self._pending_decode_steps = 0  # > 0: the pending event is a pure-decode run
        # Totals for reports.
        self.steps = 0
        self.busy_s = 0.0
        self.preemptions = 0
        self.requests = 0
        self.routed_tokens = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.emitted_tokens = 0

    # -- queue -------------------------------------------------------------------------

    def enqueue(self, seq: Seq) -> None:
        seq.replica = self.replica_id
        self.requests += 1
        self.routed_tokens += seq.prompt + seq.output
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def flush_late(self) -> None:
        """Release the blocks of finished sequences still held (the engine went idle, or
        the batch they were invisible to has been formed)."""
        for seq in self._late:
            self.kv.release(seq.refs, seq.private)
            seq.refs = []
            seq.private = 0
        self._late = []

    def private_blocks(self) -> int:
        return sum(s.private for s in self.running) + sum(s.private for s in self._late)

    # -- one step or a decode run ------------------------------------------------------

    def start_step(self, now: float, bound: float) -> float:
        """Form the next batch at `now`; return when the step (or decode run) ends."""
        back_to_back = now == self._last_end
        if not back_to_back:
            self.flush_late()  # idle engine: everything it finished is processed
        # Async scheduling: this batch was formed when the previous step was launched.
        cutoff = self._last_start if (self.async_scheduling and back_to_back) else now
        end = self._form_step(now, bound, cutoff)
        self._last_end = end
        return end

    def _form_step(self, now: float, bound: float, cutoff: float) -> float:
        B = self.block_size
        kv = self.kv
        running = self.running
        budget = self.max_num_batched_tokens
        sched: list[tuple[Seq, int]] = []
        chunks: list[tuple[int, int]] = []
        n_dec = 0
        dec_kv = 0
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = seq.prompt + seq.generated - seq.computed
            if n > budget:
                n = budget
            need = -(-(seq.computed + n) // B) - len(seq.refs) - seq.private
            scheduled = True
            while need > 0 and not kv.allocate(need):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            if need > 0:
                seq.private += need
            self._register_prompt_blocks(seq, seq.computed + n)
            sched.append((seq, n))
            budget -= n
            if n == 1 and seq.generated > 0:
                n_dec += 1
                dec_kv += seq.computed + 1
            else:
                chunks.append((n, seq.computed))
            i += 1

        admitted = 0
        held = len(self._late)  # slots of finished sequences the scheduler still counts
        blocked = False  # a waiting request arrived too late for this batch
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) + held < self.max_num_seqs:
                seq = waiting[0]
                if seq.arrival_s > cutoff:
                    blocked = True
                    break
                n = self._admit(seq, budget)
                if n == 0:
                    break
                waiting.popleft()
                running.append(seq)
                admitted += 1
                self._register_prompt_blocks(seq, seq.computed + n)
                sched.append((seq, n))
                budget -= n
                chunks.append((n, seq.computed))

        if not sched:
            if self.waiting and preempted:
                # Everything running was preempted this step; vLLM admits on the next step.
                return self._form_step(now, bound, cutoff)
            if self._late or cutoff < now:
                # An empty batch: the engine waits for the step in flight, processes its
                # outputs and schedules again, with everything it now knows.
                self.flush_late()
                return self._form_step(now, bound, now)
            head = self.waiting[0] if self.waiting else None
            raise RuntimeError(
                f"replica {self.replica_id}: nothing schedulable"
                + (
                    f"; request {head.req.request_id} ({head.prompt}+{head.output} tokens) can never fit "
                    f"{kv.capacity} blocks of {B} tokens"
                    if head
                    else ""
                )
            )

        # The batch is formed: blocks of sequences finished before it are free from now on.
        released = bool(self._late)
        self.flush_late()
        # Engines sharing the cores stretch this step, and a decode run's steps alike (an
        # arrival, which can wake another engine, ends the run).
        stretch = self.contention(self) if self.contention is not None else 1.0
        if self.batch_stretch:
            stretch *= 1.0 + self.batch_stretch * (len(sched) - 1)
        dt = self.step_time.step_ms(chunks, n_dec, dec_kv) / 1000.0 * stretch
        end = now + dt
        self._last_start = now
        steps = 1
        # A decode run needs a state that cannot change between its steps: with async
        # scheduling, blocks freed now or a request admissible from the next step on
        # could change the next batch.
        stable = not (released and self.waiting) and not blocked
        if self.decode_runs and stable and not chunks and not preempted and admitted == 0 and n_dec == len(running):
            steps, end, self._last_start = self._extend_decode_run(now + dt, bound, n_dec, dec_kv, now, stretch)
        self._pending = sched
        self._pending_decode_steps = steps if not chunks else 0
        self.steps += steps
        self.busy_s += end - now
        self.busy = True
        return end

    def _register_prompt_blocks(self, seq: Seq, upto_tokens: int) -> None:
        """Make the full prompt blocks below upto_tokens shareable (at schedule time)."""
        if seq.next_reg >= seq.full_blocks:
            return
        upto = min(upto_tokens, seq.prompt) // self.block_size
        kv = self.kv
        hashes = seq.hashes
        for b in range(seq.next_reg, upto):
            h = hashes[b]
            if kv.register(h):
                seq.refs.append(h)
                seq.private -= 1
        if upto > seq.next_reg:
            seq.next_reg = upto

    def _admit(self, seq: Seq, budget: int) -> int:
        """Reserve KV for a waiting sequence's first chunk; 0 when it does not fit."""
        B = self.block_size
        kv = self.kv
        total = seq.prompt + seq.generated
        # A preempted sequence resumes from its own cached blocks, prompt and reply alike
        # (vLLM's recompute finds them in the prefix cache); otherwise the prompt's.
        chain = seq.resume if seq.resume else seq.hashes
        matched = kv.match(chain)
        if self.pool_match is not None and not seq.resume:
            seq.free_tokens = max(seq.free_tokens, self.pool_match(chain) * B)
        if seq.resume:
            cached = min(max(matched * B, seq.free_tokens), total)
            shared = matched
        else:
            cached = min(max(matched * B, seq.free_tokens), seq.prompt)
            shared = min(matched, seq.full_blocks)
        if cached >= total:
            cached = total - 1  # the last token is always computed (it yields the next one)
        if shared * B > cached:
            shared = cached // B
        n = min(total - cached, budget)
        need = -(-(cached + n) // B) - shared
        hits = chain[:shared]
        # vLLM 0.29 admits only when the whole sequence would fit now
        # (scheduler_reserve_full_isl, default on), then allocates chunk by chunk.
        whole = -(-total // B) - shared if self.reserve_full_sequence else need
        if whole + kv.evictable_count(hits) > kv.available():
            return 0
        kv.acquire(hits)
        kv.allocate(need)
        seq.refs = list(hits)
        seq.private = need
        seq.computed = cached
        seq.next_reg = min(shared, seq.full_blocks)
        if not seq.admitted:
            seq.admitted = True
            seq.hit_blocks = matched
            seq.hit_tokens = cached
        return n

    def _extend_decode_run(
        self, t: float, bound: float, n: int, s: int, t0: float, stretch: float = 1.0
    ) -> tuple[int, float, float]:
        """Steps 2..k of a pure-decode run whose first step runs [t0, t], each stretched
        by `stretch`; returns the steps, the run's end and the start of its last step."""
        B = self.block_size
        running = self.running
        k_max = min(seq.output - seq.generated for seq in running)
        if k_max <= 1:
            return 1, t, t0
        # Each sequence needs a new block every B tokens; the run stops before the step
        # whose allocation would need a preemption.
        firsts = []
        crossings = 0
        for seq in running:
            j1 = (len(seq.refs) + seq.private) * B - seq.computed + 1  # first step past the held blocks
            firsts.append(j1)
            if j1 <= k_max:
                crossings += (k_max - j1) // B + 1
        avail = self.kv.available()
        if crossings > avail:
            steps_at: list[int] = []
            for j1 in firsts:
                steps_at.extend(range(j1, k_max + 1, B))
            steps_at.sort()
            k_max = steps_at[avail] - 1
        step_ms = self.step_time.step_ms
        j = 1
        last_start = t0
        while j < k_max:
            dt = step_ms((), n, s + j * n) / 1000.0 * stretch
            if t + dt > bound:
                break
            last_start = t
            t += dt
            j += 1
        if j > 1:
            total = 0
            for seq, j1 in zip(running, firsts, strict=True):
                if j1 <= j:
                    c = (j - j1) // B + 1
                    seq.private += c
                    total += c
            if not self.kv.allocate(total):
                raise AssertionError("decode run allocated more blocks than it counted")
        return j, t, last_start

    def _preempt(self, seq: Seq) -> None:
        # Cache the reply's full blocks too, so the recompute after re-admission finds them.
        full = seq.full_blocks
        reply = max(0, seq.computed // self.block_size - full)
        labels = self._reply_labels(seq, reply)[:reply]
        self._register_labels(seq, labels)
        seq.resume = list(seq.hashes[:full]) + labels
        self.kv.release(seq.refs, seq.private)
        seq.refs = []
        seq.private = 0
        seq.computed = 0
        seq.next_reg = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish_step(self, now: float) -> list[Seq]:
        """Apply the pending step's results at its end time `now`; return finished sequences."""
        finished: list[Seq] = []
        k = self._pending_decode_steps
        for seq, n in self._pending:
            if k:
                seq.computed += k
                seq.generated += k
                self.decode_tokens += k
                self.emitted_tokens += k
            else:
                if n == 1 and seq.generated:
                    self.decode_tokens += 1
                else:
                    self.prefill_tokens += n
                seq.computed += n
                if seq.computed == seq.prompt + seq.generated:
                    seq.generated += 1
                    self.emitted_tokens += 1
                    if seq.first_token_s < 0:
                        seq.first_token_s = now
            if seq.generated >= seq.output:
                finished.append(seq)
        self._pending = []
        self._pending_decode_steps = 0
        self.busy = False
        if finished:
            done = set(id(s) for s in finished)
            self.running = [s for s in self.running if id(s) not in done]
            for seq in finished:
                seq.finish_s = now
        return finished

    def release_finished(self, seq: Seq) -> list[int]:
        """Cache a finished sequence's blocks and release them; return the chained hashes
        of every block it leaves cached (prompt, then reply), for the router."""
        kv = self.kv
        full = seq.full_blocks
        labels = self._reply_labels(seq, max(0, seq.computed // self.block_size - full))
        self._register_labels(seq, labels)
        if self.async_scheduling:
            self._late.append(seq)  # cached now; its blocks free once the next batch is formed
        else:
            kv.release(seq.refs, seq.private)
            seq.refs = []
            seq.private = 0
        return list(seq.hashes[:full]) + labels

    def _reply_labels(self, seq: Seq, reply_blocks: int) -> list[int]:
        """Chained hashes for the blocks past the prompt's full ones: from the trace's
        output_block_ids when it names them, else the prompt's partial block id (a later
        identical prompt reuses it, as vLLM reuses its 16-token sub-blocks) followed by
        fresh ids that never hit. Kept on the sequence, so a preempted one that resumes
        caches its reply under the same hashes again."""
        B = self.block_size
        full = seq.full_blocks
        if seq.req.output_block_ids:
            seed = output_chain_seed(seq.hashes, seq.prompt, B)
            return chain_block_ids(seq.req.output_block_ids[:reply_blocks], seed)
        labels = seq.reply_labels
        if not labels and seq.prompt % B:
            labels.append(seq.hashes[-1])
        extra = reply_blocks - len(labels)
        if extra > 0:
            seed = labels[-1] if labels else (seq.hashes[full - 1] if full else 0)
            labels.extend(chain_block_ids([self._fresh_id() for _ in range(extra)], seed))
        return list(labels[: max(reply_blocks, 1 if seq.prompt % B else 0)])

    def _register_labels(self, seq: Seq, labels: Sequence[int]) -> None:
        """Register private blocks under these hashes (ones it already shares stay)."""
        kv = self.kv
        for h in labels:
            if seq.private <= 0:
                break
            if h in seq.refs:
                continue
            if kv.register(h):
                seq.refs.append(h)
                seq.private -= 1

    # -- what the router sees ------------------------------------------------------------

    def stats(self) -> tuple[int, int, float]:
        """(num_waiting, num_running, kv_usage) as record_routing_stats reports them."""
        return len(self.waiting), len(self.running), self.kv.usage()
