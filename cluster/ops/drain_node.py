"""The preStop hook of a Ray worker pod (engine and gateway groups): drain this Ray node
before Kubernetes stops the pod (node drain, scale-down, eviction).

KubeRay's `ray start --block` exits at SIGTERM, taking every replica on the pod down with
its requests. First, then, this tells Ray's GCS the node is going away, with a deadline
(`ray drain-node`, reason preemption): Serve starts replacements of the node's replicas
elsewhere, takes the node's replicas out of routing and stops them gracefully (each
finishes its requests, up to its graceful_shutdown_timeout_s). The hook returns when no
Serve replica process is left in the pod, or at the deadline; Kubernetes then sends
SIGTERM. The deadline is drain.replica_shutdown_s and the pod's
terminationGracePeriodSeconds is drain.pod_termination_s (30 s more), both from the typed
config (cluster/ops/helm_values.py renders them into the chart).

    python -m cluster.ops.drain_node --deadline-s 600
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

# Ray sets an actor's process title to `ray::<class>...`; Serve replicas are ServeReplica actors.
REPLICA_TITLE = "ray::ServeReplica"


def drain_command(deadline_s: int, reason_message: str) -> list[str]:
    return [
        "ray",
        "drain-node",
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        reason_message,
        "--deadline-remaining-seconds",
        str(deadline_s),
    ]


def replica_pids(proc: str = "/proc", title: str = REPLICA_TITLE) -> list[int]:
    """Serve replica processes visible here (the pod's own, in its PID namespace): those
    whose process title starts with `title`."""
    out = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(os.path.join(proc, entry, "cmdline"), "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if cmdline.startswith(title):
            out.append(int(entry))
    return out


def wait_drained(deadline_s: float, *, poll_s: float = 2.0, proc: str = "/proc", title: str = REPLICA_TITLE) -> bool:
    """Until no Serve replica process is left (True) or `deadline_s` passed (False)."""
    end = time.monotonic() + deadline_s
    while replica_pids(proc, title):
        if time.monotonic() >= end:
            return False
        time.sleep(min(poll_s, max(0.0, end - time.monotonic())))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.ops.drain_node", description=__doc__.split("\n\n")[0])
    p.add_argument("--deadline-s", type=int, required=True, help="drain.replica_shutdown_s")
    p.add_argument("--poll-s", type=float, default=2.0)
    args = p.parse_args(argv)
    started = time.monotonic()
    pod = os.environ.get("HOSTNAME", "this pod")
    try:
        # Bounded: the drain request is one GCS call; its wait must leave the deadline intact.
        subprocess.run(drain_command(args.deadline_s, f"{pod} is terminating"), check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        # Without the drain the replicas still get SIGTERM's shutdown; say why, keep going.
        print(f"drain-node failed ({exc}); waiting for the replicas anyway", file=sys.stderr)
    left = args.deadline_s - (time.monotonic() - started)
    drained = wait_drained(max(0.0, left), poll_s=args.poll_s)
    print(
        f"{'drained' if drained else 'deadline reached with replicas left'} after {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
