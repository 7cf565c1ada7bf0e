"""`cluster bench chaos`: streaming load against the local cluster while engine replicas
are killed or wedged on a schedule; what clients saw.

Starts the local cluster (profile cpu-tiny by default), runs `--concurrency` streaming
chat requests back to back (ignore_eos, fixed max_tokens, so a complete reply has exactly
max_tokens tokens) for `--duration-s`, and applies `--faults`: `kill@T` SIGKILLs an
engine replica process of the standard pool T seconds in, `stop@T` SIGSTOPs its engine
core (resumed at the end). Prints requests sent, failed (not 200, no [DONE], an error
event, or a wrong token count), retried before the first token (X-Attempts > 1), streams
with a stall (largest gap between chunks above `--stall-s`: a migrated stream's pause),
their stall p50/p99, and for each fault the time until the pool had all its replicas
running again. Run one cluster per machine at a time: the engines need the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Sample:
    status: int
    ok: bool
    attempts: int
    max_gap_s: float
    seconds: float
    error: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu-tiny")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--duration-s", type=float, default=180.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--faults", default="kill@20,stop@100", help="comma-separated kill@T / stop@T (seconds)")
    p.add_argument("--stall-s", type=float, default=1.0)


def _one(http: httpx.Client, model: str, max_tokens: int, i: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"chaos {i}: a long story"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = last = time.monotonic()
    gap = 0.0
    events: list[str] = []
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            attempts = int(r.headers.get("x-attempts", "1"))
            buf = ""
            for piece in r.iter_text():
                now = time.monotonic()
                gap, last = max(gap, now - last), now
                buf += piece
                *done, buf = buf.split("\n\n")
                events += [e[6:] for e in done if e.startswith("data: ")]
            status = r.status_code
    except httpx.HTTPError as exc:  # the connection broke: what the client library saw
        return Sample(0, False, 0, gap, time.monotonic() - t0, f"{type(exc).__name__}: {exc}"[:200])
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    errors = [c["error"].get("message", "") for c in chunks if isinstance(c.get("error"), dict)]
    ok = (
        status == 200
        and bool(events)
        and events[-1] == "[DONE]"
        and not any("error" in c for c in chunks)
        and bool(usage)
        and usage[-1]["completion_tokens"] == max_tokens
    )
    error = "" if ok else (errors[0] if errors else f"status {status}, {len(events)} events")[:200]
    return Sample(status, ok, attempts, gap, time.monotonic() - t0, error)


def engine_replica_pids(app: str, pool: str) -> dict[str, int]:
    """Live engine replicas of `pool`: replica id (the gateway's X-Served-By) -> pid."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#engine-{pool}#"
    out: dict[str, int] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith(prefix):
            try:
                actor = ray.get_actor(name, namespace="serve")
                pid: Any = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
                out[name[len(prefix) :]] = int(pid)
            except Exception:  # a dying replica
                continue
    return out


def _running(app: str, pool: str) -> int:
    """Replicas of `pool` Serve reports RUNNING (started, warmed up, health-checked)."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(f"engine-{pool}") if status is not None else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0  # type: ignore[call-overload]


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the engine core a replica started)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> int:
    from cluster.ops.local import start_local_cluster
    from cluster.profiles import load_profile
    from deployments.serve_config import APP_NAME

    cfg = load_profile(args.profile)
    faults = [(kind, float(at)) for kind, at in (f.split("@") for f in args.faults.split(",") if f)]
    cluster = start_local_cluster(cfg, progress=lambda m: print(m, flush=True))
    samples: list[Sample] = []
    stopped: list[int] = []
    healed: list[tuple[str, float, float | None]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + args.duration_s
    try:
        http = httpx.Client(base_url=cluster.base_url, timeout=300)
        counter = iter(range(10**9))

        def worker() -> None:
            while time.monotonic() < end:
                sample = _one(http, cfg.model.served_name, args.max_tokens, next(counter))
                with lock:
                    samples.append(sample)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        want = cfg.pool("standard").start_replicas
        for kind, at in sorted(faults, key=lambda f: f[1]):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            before = engine_replica_pids(APP_NAME, "standard")
            victim, pid = sorted(before.items())[0]
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                for child in child_pids(pid):
                    os.kill(child, signal.SIGSTOP)
                    stopped.append(child)
            hit = time.monotonic()
            print(f"[chaos] {hit - t0:6.1f} s  {kind} replica {victim} (pid {pid})", flush=True)
            back = None
            while time.monotonic() < end:
                now_ids = engine_replica_pids(APP_NAME, "standard")
                # A replica that did not exist at the fault, and the pool whole and RUNNING.
                replaced = bool(set(now_ids) - set(before)) and victim not in now_ids
                if replaced and _running(APP_NAME, "standard") == want:
                    back = time.monotonic() - hit
                    break
                time.sleep(2)
            healed.append((kind, at, back))
            print(f"[chaos] replacement serving after {back if back is None else round(back, 1)} s", flush=True)
        for t in threads:
            t.join()
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        cluster.stop()
    stalls = [s.max_gap_s for s in samples if s.max_gap_s > args.stall_s]
    failed = [s for s in samples if not s.ok]
    print(f"\nrequests sent      {len(samples)}")
    print(f"failed             {len(failed)}  (status {sorted({s.status for s in failed})})")
    for error, count in Counter(s.error for s in failed).most_common(5):
        print(f"  {count} x {error}")
    print(f"retried (attempts) {sum(1 for s in samples if s.attempts > 1)}")
    print(f"stalled streams    {len(stalls)} (gap > {args.stall_s} s): p50 {_pct(stalls, 0.5):.2f} s, "
          f"p99 {_pct(stalls, 0.99):.2f} s")  # fmt: skip
    print(f"latency p50        {statistics.median([s.seconds for s in samples]) if samples else 0:.2f} s")
    for kind, at, back in healed:
        print(f"fault {kind}@{at:.0f}s: pool whole again after {'-' if back is None else f'{back:.0f} s'}")
    return 1 if failed else 0
