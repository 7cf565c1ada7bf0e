"""`cluster bench chaos`: streaming load against the local cluster while engine replicas
are killed, wedged or drained on a schedule; what clients saw.

Starts the local cluster (profile cpu-tiny by default), runs `--concurrency` streaming
chat requests back to back (ignore_eos, fixed max_tokens, so a complete reply has exactly
max_tokens tokens) until `--tail-s` after the last fault healed (`--duration-s` at
most), and applies `--faults` to the standard pool, in order (each waits until the pool
is whole again after the one before):
- `kill@T`: SIGKILL an engine replica process T seconds in;
- `stop@T`: SIGSTOP its engine core (resumed at the end);
- `drain@T`: a config change that scales the pool down by one replica, redeployed as
  `cluster serve` deploys the app (a rolling update: new replicas first, old ones stop
  gracefully), then, once that is done, the change back (scale up again).
A schedule repeats a fault by naming it again (`kill@15,drain@60,kill@150`).

Prints requests sent, failed (not 200, no [DONE], an error event, or a wrong token count)
with what they saw, retried before the first token (client-side X-Attempts > 1, and the
gateway's retry counter), migrated streams (the gateway's counter), the stall the
migrated streams saw (the largest gap between chunks of the streams with the largest
gaps, as many as were migrated: a migration is the only cause of multi-second gaps on an
idle box, on a busy one this over-estimates); then the same for each fault (the requests
in flight from the fault until the pool had all its replicas serving again) with that
time. A fault still due when the run ends (the ones before it healed slowly: a drain is
two rolling updates of every deployment) is reported as not fired, and like a failed
request or a pool not whole again by the end, makes the exit status 1. Run one cluster
per machine at a time: the engines need the cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.live.replicas import child_pids, replica_table, running_replica_pids, wait_pool
from bench.live.streams import StreamResult, stream_chat
from cluster.config import ClusterConfig

POOL = "standard"
FAULTS = ("kill", "stop", "drain")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu-tiny")
    p.add_argument("--concurrency", type=int, default=12)
    # An upper bound: the load ends --tail-s after the last fault healed, and a drain is two
    # rolling updates of every deployment (140-340 s each on a loaded 2-core box).
    p.add_argument("--duration-s", type=float, default=1200.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--faults", default="kill@20,stop@120,drain@240", help="comma-separated kill@T / stop@T / drain@T (seconds)"
    )
    p.add_argument("--stall-s", type=float, default=1.0)
    p.add_argument(
        "--tail-s",
        type=float,
        default=30.0,
        help="end the load this long after the last fault healed, if that is before --duration-s",
    )


def parse_faults(spec: str) -> list[tuple[str, float]]:
    faults = []
    for item in filter(None, spec.split(",")):
        kind, _, at = item.partition("@")
        if kind not in FAULTS or not at:
            raise SystemExit(f"--faults: {item!r} is not one of {'/'.join(FAULTS)}@SECONDS")
        faults.append((kind, float(at)))
    return sorted(faults, key=lambda f: f[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class GatewayCounters:
    """mls_gateway_retries_total / migrations_total summed over the gateway replicas a
    scrape of the API port reached: a redeploy starts new replicas whose counters start
    at 0, so each replica (mls_gateway_start_time_seconds) is kept apart."""

    by_replica: dict[float, tuple[float, float]] = field(default_factory=dict)

    def scrape(self, http: httpx.Client) -> None:
        try:
            text = http.get("/metrics", timeout=5).text
        except httpx.HTTPError:
            return
        started, retries, migrations = None, 0.0, 0.0
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("mls_gateway_start_time_seconds"):
                started = float(value)
            elif name.startswith("mls_gateway_retries_total"):
                retries += float(value)
            elif name.startswith("mls_gateway_migrations_total"):
                migrations += float(value)
        if started is not None:
            self.by_replica[started] = (retries, migrations)

    @property
    def retries(self) -> int:
        return int(sum(r for r, _ in list(self.by_replica.values())))

    @property
    def migrations(self) -> int:
        return int(sum(m for _, m in list(self.by_replica.values())))

    def totals(self) -> tuple[int, int]:
        """(retries, migrations) as of the last scrape."""
        return self.retries, self.migrations


def resized(cfg: ClusterConfig, replicas: int) -> ClusterConfig:
    """`cfg` with the chaos pool at exactly `replicas` replicas."""
    out = cfg.model_copy(deep=True)
    pool = out.pool(POOL)
    pool.min_replicas = pool.max_replicas = replicas
    pool.initial_replicas = None
    return out


@dataclass
class FaultRecord:
    """One fault as it happened: when it hit, when the pool was whole again (None: not by
    the end of the run), the gateway's counters at both moments, and the steps of a drain
    (its two rollouts)."""

    kind: str
    at: float  # scheduled, seconds into the run
    hit: float | None = None  # time.monotonic(); None: not fired, the run ended first
    healed: float | None = None
    counters_at_hit: tuple[int, int] = (0, 0)  # (retries, migrations)
    counters_at_heal: tuple[int, int] = (0, 0)
    steps: list[str] = field(default_factory=list)

    def in_window(self, sample: StreamResult, end: float) -> bool:
        """`sample` was in flight between the hit and the heal (or the end of the run)."""
        if self.hit is None:
            return False
        until = self.healed if self.healed is not None else end
        return sample.started_at < until and sample.started_at + sample.seconds > self.hit


class FaultRunner:
    """Applies the faults to the standard pool of the running cluster, one at a time."""

    def __init__(self, cfg: ClusterConfig, t0: float, end: float, counters: GatewayCounters) -> None:
        self.cfg, self.t0, self.end, self.counters = cfg, t0, end, counters
        self.want = cfg.pool(POOL).start_replicas
        self.stopped: list[int] = []
        self.records: list[FaultRecord] = []

    def log(self, msg: str) -> None:
        print(f"[chaos] {time.monotonic() - self.t0:6.1f} s  {msg}", flush=True)

    def apply(self, kind: str, at: float) -> None:
        """Wait for `at`, apply the fault, then wait until the pool is whole again (all its
        replicas RUNNING, none of those the fault hit). A fault whose time comes only after
        the end of the run (those before it healed too slowly) is recorded as not fired."""
        record = FaultRecord(kind, at)
        self.records.append(record)
        time.sleep(max(0.0, self.t0 + at - time.monotonic()))
        if time.monotonic() >= self.end:
            self.log(f"{kind}@{at:.0f}: not fired, the run has ended")
            return
        before = running_replica_pids(POOL)  # a replica still starting is no fault target
        victim, pid = sorted(before.items())[0]
        record.hit, record.counters_at_hit = time.monotonic(), self.counters.totals()
        gone = {victim}
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
            self.log(f"kill replica {victim} (pid {pid})")
        elif kind == "stop":
            for child in child_pids(pid):
                os.kill(child, signal.SIGSTOP)
                self.stopped.append(child)
            self.log(f"stop the engine core of replica {victim} (pid {pid})")
        else:
            gone = self.drain(set(before), record)
        if wait_pool(POOL, self.want, max(0.0, self.end - time.monotonic()), gone=gone) is not None:
            record.healed, record.counters_at_heal = time.monotonic(), self.counters.totals()
        self.log(f"pool whole again after {fmt_s(seconds_between(record.hit, record.healed))}")

    def drain(self, old: set[str], record: FaultRecord) -> set[str]:
        """Scale the pool down by one replica with a config change (a rolling update), then
        back up once that is done; returns the replicas the whole pool must not contain."""
        from cluster.ops.local import deploy_app

        smaller = self.want - 1
        self.log(f"drain: redeploy with pool {POOL} at {smaller} replica(s)")
        deploy_app(resized(self.cfg, smaller))
        rolled = wait_pool(POOL, smaller, max(0.0, self.end - time.monotonic()), gone=old)
        record.steps.append(f"scaled down after {fmt_s(rolled)}")
        self.log(f"drain: scaled down after {fmt_s(rolled)}; {replica_table(POOL)}")
        # Scaling back up is a second rolling update that replaces the scaled-down version's
        # replicas too: the pool is whole again only once none of them serves.
        interim = {r for r, state in replica_table(POOL).items() if state == "RUNNING"}
        self.log(f"drain: redeploy with pool {POOL} at {self.want} replica(s)")
        up_from = time.monotonic()
        deploy_app(resized(self.cfg, self.want))
        up = wait_pool(POOL, self.want, max(0.0, self.end - time.monotonic()), gone=old | interim)
        record.steps.append(f"scaled up again after {fmt_s(None if up is None else time.monotonic() - up_from)}")
        return old | interim

    def resume(self) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def seconds_between(start: float | None, stop: float | None) -> float | None:
    return None if start is None or stop is None else stop - start


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f} s"


def migrated_stalls(samples: list[StreamResult], migrations: int) -> list[float]:
    """The stall the migrated streams saw: the largest gaps between chunks, as many as were
    migrated (a migration is the only cause of multi-second gaps on an idle box; on a busy
    one this over-estimates)."""
    return sorted((s.max_gap_s for s in samples), reverse=True)[: max(0, migrations)]


def report(
    samples: list[StreamResult], counters: GatewayCounters, faults: FaultRunner, args: argparse.Namespace, end: float
) -> int:
    failed = [s for s in samples if not s.whole(args.max_tokens)]
    stalls = sorted(s.max_gap_s for s in samples if s.max_gap_s > args.stall_s)
    migrated = migrated_stalls(samples, counters.migrations)
    print(f"\nrequests sent      {len(samples)}")
    print(f"failed             {len(failed)}  (status {sorted({s.status for s in failed})})")
    for error, count in Counter(s.why_not_whole(args.max_tokens) for s in failed).most_common(5):
        print(f"  {count} x {error}")
    print(f"retried            {sum(1 for s in samples if s.attempts > 1)} (X-Attempts > 1); "
          f"gateway retries {counters.retries}")  # fmt: skip
    print(f"migrated           {counters.migrations} streams (gateway counter)")
    print(f"migrated stall     p50 {percentile(migrated, 0.5):.2f} s, p99 {percentile(migrated, 0.99):.2f} s "
          f"(the {len(migrated)} largest gaps)")  # fmt: skip
    print(f"stalled streams    {len(stalls)} (gap > {args.stall_s} s): p50 {percentile(stalls, 0.5):.2f} s, "
          f"p99 {percentile(stalls, 0.99):.2f} s")  # fmt: skip
    print(f"latency p50        {statistics.median([s.seconds for s in samples]) if samples else 0:.2f} s")
    print("per fault (the requests in flight from the fault until the pool was whole again):")
    for r in faults.records:
        if r.hit is None:
            print(f"  {r.kind}@{r.at:.0f}s: not fired (the run ended first)")
            continue
        window = [s for s in samples if r.in_window(s, end)]
        after = r.counters_at_heal if r.healed is not None else counters.totals()
        retries, migrations = (b - a for a, b in zip(r.counters_at_hit, after, strict=True))
        stall = migrated_stalls(window, migrations)
        steps = f" ({', '.join(r.steps)})" if r.steps else ""
        print(
            f"  {r.kind}@{r.at:.0f}s, hit at {r.hit - faults.t0:.0f} s: {len(window)} requests, "
            f"{sum(1 for s in window if not s.whole(args.max_tokens))} failed, "
            f"{sum(1 for s in window if s.attempts > 1)} retried (gateway {retries}), {migrations} migrated, "
            f"stall p50 {percentile(stall, 0.5):.2f} s p99 {percentile(stall, 0.99):.2f} s; "
            f"pool whole again after {fmt_s(seconds_between(r.hit, r.healed))}{steps}"
        )
    unhealed = [r for r in faults.records if r.healed is None]
    return 1 if failed or unhealed else 0


def run(args: argparse.Namespace) -> int:
    from cluster.ops.local import start_local_cluster
    from cluster.profiles import load_profile

    cfg = load_profile(args.profile)
    schedule = parse_faults(args.faults)
    cluster = start_local_cluster(cfg, progress=lambda m: print(m, flush=True))
    samples: list[StreamResult] = []
    counters = GatewayCounters()
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + args.duration_s
    faults = FaultRunner(cfg, t0, end, counters)
    try:
        http = httpx.Client(base_url=cluster.base_url, timeout=300)
        counter = iter(range(10**9))

        # Set once the schedule is through and the tail has run: the load ends then, or at
        # `end`, whichever comes first (a long --duration-s leaves room for slow rollouts).
        finished = threading.Event()

        def worker() -> None:
            while time.monotonic() < end and not finished.is_set():
                sample = stream_chat(
                    http, cfg.model.served_name, f"chaos {next(counter)}: a long story", max_tokens=args.max_tokens
                )
                with lock:
                    samples.append(sample)

        def scraper() -> None:
            while time.monotonic() < end + 5 and not finished.is_set():
                counters.scrape(http)
                time.sleep(1.0)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        threads.append(threading.Thread(target=scraper, daemon=True))
        for t in threads:
            t.start()
        for kind, at in schedule:
            faults.apply(kind, at)
        finished.wait(max(0.0, min(end, time.monotonic() + args.tail_s) - time.monotonic()))
        finished.set()
        for t in threads:
            t.join()
        stopped = time.monotonic()
        counters.scrape(http)  # the last requests' retries and migrations
    finally:
        faults.resume()
        cluster.stop()
    faults.log(f"load ended after {stopped - t0:.0f} s")
    return report(samples, counters, faults, args, stopped)
