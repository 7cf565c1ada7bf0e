"""The worker pods' preStop drain (cluster/ops/drain_node.py): it waits for real Serve-replica
processes (found by their process title, in /proc) and never past its deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cluster.ops.drain_node import REPLICA_TITLE, drain_command, replica_pids, wait_drained

# A replica title no real cluster on this machine has (a local cluster may be running).
TITLE = f"{REPLICA_TITLE}:drain-test-{os.getpid()}"


def _replica(seconds: float) -> subprocess.Popen[bytes]:
    code = f"import time; time.sleep({seconds})"
    # exec -a sets argv[0], the way Ray's setproctitle shows up in /proc/PID/cmdline.
    title = f"{TITLE}:engine-standard"
    return subprocess.Popen(["bash", "-c", f'exec -a "{title}" {sys.executable} -c "{code}"'])


def test_finds_replica_processes_by_title() -> None:
    proc = _replica(30)
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in replica_pids(title=TITLE) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.pid in replica_pids(title=TITLE)
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in replica_pids(title=TITLE)


def test_waits_until_the_replicas_are_gone() -> None:
    proc = _replica(1.5)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        assert wait_drained(20, poll_s=0.1, title=TITLE)
        assert proc.poll() is not None and time.monotonic() - started < 20
    finally:
        proc.kill()
        proc.wait()


def test_gives_up_at_the_deadline() -> None:
    proc = _replica(30)
    try:
        time.sleep(0.2)
        assert not wait_drained(0.5, poll_s=0.1, title=TITLE)
        assert proc.poll() is None  # the hook never kills anything itself
    finally:
        proc.kill()
        proc.wait()


def test_asks_ray_for_a_drain_with_the_deadline() -> None:
    command = drain_command(600, "pod x is terminating")
    assert command[:2] == ["ray", "drain-node"]
    assert command[command.index("--deadline-remaining-seconds") + 1] == "600"
    assert command[command.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
