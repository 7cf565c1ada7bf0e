"""`cluster bench chaos`: streaming load against the local cluster while engine replicas
are killed, wedged or drained on a schedule; what clients saw.

Starts the local cluster (profile cpu-tiny by default), runs `--concurrency` streaming
chat requests back to back (ignore_eos, fixed max_tokens, so a complete reply has exactly
max_tokens tokens) for `--duration-s`, and applies `--faults` to the standard pool, in
order (each waits until the pool is whole again after the one before):
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
idle box, on a busy one this over-estimates), and for each fault the time until the pool
had all its replicas serving again. Run one cluster per machine at a time: the engines
need the cores.
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
HEAL_TIMEOUT_S = 600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu-tiny")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--duration-s", type=float, default=180.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--faults", default="kill@20,stop@100", help="comma-separated kill@T / stop@T / drain@T (seconds)")
    p.add_argument("--stall-s", type=float, default=1.0)


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
        return int(sum(r for r, _ in self.by_replica.values()))

    @property
    def migrations(self) -> int:
        return int(sum(m for _, m in self.by_replica.values()))


def resized(cfg: ClusterConfig, replicas: int) -> ClusterConfig:
    """`cfg` with the chaos pool at exactly `replicas` replicas."""
    out = cfg.model_copy(deep=True)
    pool = out.pool(POOL)
    pool.min_replicas = pool.max_replicas = replicas
    pool.initial_replicas = None
    return out


class FaultRunner:
    """Applies the faults to the standard pool of the running cluster, one at a time."""

    def __init__(self, cfg: ClusterConfig, t0: float, end: float) -> None:
        self.cfg, self.t0, self.end = cfg, t0, end
        self.want = cfg.pool(POOL).start_replicas
        self.stopped: list[int] = []
        self.healed: list[tuple[str, float, float | None]] = []

    def log(self, msg: str) -> None:
        print(f"[chaos] {time.monotonic() - self.t0:6.1f} s  {msg}", flush=True)

    def apply(self, kind: str, at: float) -> None:
        time.sleep(max(0.0, self.t0 + at - time.monotonic()))
        before = running_replica_pids(POOL)  # a replica still starting is no fault target
        victim, pid = sorted(before.items())[0]
        hit = time.monotonic()
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
            self.log(f"kill replica {victim} (pid {pid})")
        elif kind == "stop":
            for child in child_pids(pid):
                os.kill(child, signal.SIGSTOP)
                self.stopped.append(child)
            self.log(f"stop the engine core of replica {victim} (pid {pid})")
        else:
            self.drain(set(before))
        back = wait_pool(POOL, self.want, max(0.0, self.end - time.monotonic()), gone={victim})
        self.healed.append((kind, at, None if back is None else time.monotonic() - hit))
        self.log(f"pool whole again after {'-' if back is None else f'{time.monotonic() - hit:.1f} s'}")

    def drain(self, old: set[str]) -> None:
        from cluster.ops.local import deploy_app

        smaller = self.want - 1
        self.log(f"drain: redeploy with pool {POOL} at {smaller} replica(s)")
        deploy_app(resized(self.cfg, smaller))
        rolled = wait_pool(POOL, smaller, max(0.0, self.end - time.monotonic()), gone=old)
        self.log(f"drain: scaled down {'-' if rolled is None else f'after {rolled:.1f} s'}; {replica_table(POOL)}")
        self.log(f"drain: redeploy with pool {POOL} at {self.want} replica(s)")
        deploy_app(resized(self.cfg, self.want))

    def resume(self) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def report(
    samples: list[StreamResult], counters: GatewayCounters, faults: FaultRunner, args: argparse.Namespace
) -> int:
    failed = [s for s in samples if not s.whole(args.max_tokens)]
    gaps = sorted((s.max_gap_s for s in samples), reverse=True)
    stalls = [g for g in gaps if g > args.stall_s]
    migrated = gaps[: counters.migrations]
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
    for kind, at, back in faults.healed:
        print(f"fault {kind}@{at:.0f}s: pool whole again after {'-' if back is None else f'{back:.0f} s'}")
    return 1 if failed else 0


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
    faults = FaultRunner(cfg, t0, end)
    try:
        http = httpx.Client(base_url=cluster.base_url, timeout=300)
        counter = iter(range(10**9))

        def worker() -> None:
            while time.monotonic() < end:
                sample = stream_chat(
                    http, cfg.model.served_name, f"chaos {next(counter)}: a long story", max_tokens=args.max_tokens
                )
                with lock:
                    samples.append(sample)

        def scraper() -> None:
            while time.monotonic() < end + 5:
                counters.scrape(http)
                time.sleep(1.0)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        threads.append(threading.Thread(target=scraper, daemon=True))
        for t in threads:
            t.start()
        for kind, at in schedule:
            if time.monotonic() < end:
                faults.apply(kind, at)
        for t in threads:
            t.join()
    finally:
        faults.resume()
        cluster.stop()
    return report(samples, counters, faults, args)
