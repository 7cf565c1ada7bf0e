"""Tensor-parallel all-reduce cost for the simulator: NCCL through torch.distributed.

Every Mistral Large 2 layer all-reduces its hidden state twice (after O and after down),
12288 bf16 values per token, across the TP group of one node. This times exactly those
messages: decode batches of 1..512 tokens and prefill chunks up to the chunked-prefill
budget (8192 tokens), one process per GPU, eagerly and captured in a CUDA graph (vLLM
replays its decode steps from graphs), and fits the ring model

    t(n, S) = 2(n-1) * (alpha + S / (n * beta))

per ring step. Group sizes that could not be run are extrapolated from the fit, and the
table keeps `measured` and `extrapolated` apart.

    python3 bench/calibration/profile_allreduce.py --out DIR            # every GPU of the machine
    python3 bench/calibration/profile_allreduce.py --smoke --out DIR    # 2 CPU processes over gloo
    python3 bench/calibration/profile_allreduce.py --refit FILE.json    # refit an existing table

NVLink multicast (NVLS) stays off: a program that uses it can take a shared host's GPUs
out of service. torch is imported lazily so bench/calibration/step_time.py can import the fit.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# NVLink multicast off (not every GPU pool supports it); set before NCCL or torch can read them.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

HIDDEN = 12288
DTYPE_BYTES = 2
DECODE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
PREFILL_TOKENS = [1024, 2048, 4096, 8192]
EXTRAPOLATE_TO = [2, 4, 8]


def ring_us(n: int, nbytes: float, alpha_us: float, beta_gbps: float) -> float:
    """Ring all-reduce of nbytes over n GPUs: 2(n-1) steps of nbytes/n each."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * (alpha_us + nbytes / (n * beta_gbps * 1e3))


def fit_alpha_beta(points: Sequence[tuple[int, float, float]]) -> tuple[float, float, float]:
    """Least-squares fit of the ring model over (n, bytes, us) points, each weighted by 1/t
    so that small and large messages count alike. Returns (alpha_us, beta_GB/s, the largest
    relative error of the fit over the points)."""
    # Divide t = a * 2(n-1) + c * 2(n-1)/n * S by t: 1 = a * x1 + c * x2, linear in (a, c = 1/beta).
    s11 = s12 = s22 = b1 = b2 = 0.0
    for n, nbytes, us in points:
        x1 = 2 * (n - 1) / us
        x2 = 2 * (n - 1) / n * nbytes / us
        s11 += x1 * x1
        s12 += x1 * x2
        s22 += x2 * x2
        b1 += x1
        b2 += x2
    det = s11 * s22 - s12 * s12
    if det <= 0:
        raise ValueError("the all-reduce fit needs at least two distinct message sizes")
    alpha = max((b1 * s22 - b2 * s12) / det, 0.0)
    inv_beta = (s11 * b2 - s12 * b1) / det  # us per byte
    beta = 1.0 / (inv_beta * 1e3) if inv_beta > 0 else math.inf
    worst = max(abs(ring_us(n, nbytes, alpha, beta) - us) / us for n, nbytes, us in points)
    return alpha, beta, worst


def build_table(measured: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Fit and the per-TP table (measured where run, extrapolated elsewhere), from the
    graph-replay timings, which are what a decode step pays."""
    points = [
        (int(n), b, us) for n, curve in measured.items() for b, us in zip(curve["bytes"], curve["us"], strict=True)
    ]
    alpha, beta, worst = fit_alpha_beta(points)
    rows = []
    for n in sorted({*EXTRAPOLATE_TO, *(int(k) for k in measured)}):
        curve = measured.get(str(n))
        for tokens in DECODE_TOKENS + PREFILL_TOKENS:
            nbytes = tokens * HIDDEN * DTYPE_BYTES
            fit_us = ring_us(n, nbytes, alpha, beta)
            row: dict[str, Any] = {"tp": n, "tokens": tokens, "bytes": nbytes, "fit_us": round(fit_us, 2)}
            if curve and nbytes in curve["bytes"]:
                row["us"] = curve["us"][curve["bytes"].index(nbytes)]
                row["source"] = "measured"
            else:
                row["us"] = round(fit_us, 2)
                row["source"] = "extrapolated"
            rows.append(row)
    return {
        "fit": {
            "model": "t = 2(n-1) * (alpha + bytes / (n * beta))",
            "alpha_us": round(alpha, 4),
            "beta_gbps": round(beta, 2),
            "max_rel_error": round(worst, 4),
            "fitted_on": sorted(measured),
        },
        "table": rows,
    }


# ---------------------------------------------------------------------------------------
# Measurement (torch imported here only).


def _worker(rank: int, world: int, args: argparse.Namespace, port: int, result_path: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MULTICAST_OFF)
    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [1, 4, 16, 64] if args.smoke else DECODE_TOKENS + PREFILL_TOKENS
    groups = [n for n in (2, 4, 8) if n <= world] if world >= 2 else []
    out: dict[str, Any] = {"eager": {}, "graph": {}, "graph_error": None}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Correctness once: the sum of ones is the group size.
    check = torch.ones(1024, device=device, dtype=dtype)
    dist.all_reduce(check)
    sync()
    assert float(check[0]) == world, f"all-reduce gave {float(check[0])}, expected {world}"

    for n in groups:
        group = dist.new_group(list(range(n))) if n < world else None
        member = rank < n
        eager: dict[str, list[float]] = {"bytes": [], "us": []}
        graph: dict[str, list[float]] = {"bytes": [], "us": []}
        for tokens in sizes:
            hidden = 64 if args.smoke else HIDDEN
            x = torch.randn(tokens * hidden, device=device, dtype=dtype) * 1e-3
            nbytes = x.numel() * x.element_size()
            iters = 5 if args.smoke else (50 if tokens <= 512 else 20)
            if member:
                for _ in range(5):
                    dist.all_reduce(x, group=group)
                sync()
            dist.barrier()
            samples = []
            if member:
                for _ in range(args.trials):
                    if cuda:
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        for _ in range(iters):
                            dist.all_reduce(x, group=group)
                        e.record()
                        e.synchronize()
                        samples.append(s.elapsed_time(e) * 1e3 / iters)
                    else:
                        t0 = time.perf_counter()
                        for _ in range(iters):
                            dist.all_reduce(x, group=group)
                        samples.append((time.perf_counter() - t0) * 1e6 / iters)
                eager["bytes"].append(nbytes)
                eager["us"].append(statistics.median(samples))
            dist.barrier()
            # CUDA graph replay, as vLLM's decode graphs run their all-reduces.
            if cuda and member and out["graph_error"] is None:
                try:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        dist.all_reduce(x, group=group)
                    torch.cuda.current_stream().wait_stream(stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(iters):
                            dist.all_reduce(x, group=group)
                    g.replay()
                    sync()
                    gs = []
                    for _ in range(args.trials):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        g.replay()
                        e.record()
                        e.synchronize()
                        gs.append(s.elapsed_time(e) * 1e3 / iters)
                    graph["bytes"].append(nbytes)
                    graph["us"].append(statistics.median(gs))
                    del g
                except Exception as exc:  # noqa: BLE001 - keep the eager numbers
                    out["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            dist.barrier()
            if rank == 0:
                gus = graph["us"][-1] if graph["bytes"] and graph["bytes"][-1] == nbytes else float("nan")
                print(
                    f"n={n} tokens={tokens:5d} bytes={nbytes:>10d} eager {eager['us'][-1]:9.2f} us "
                    f"graph {gus:9.2f} us  busbw {nbytes / eager['us'][-1] / 1e3 * 2 * (n - 1) / n:7.1f} GB/s",
                    flush=True,
                )
        # The slowest rank sets the pace of a TP group: keep the max across ranks.
        # Every rank sends a vector of the same length (non-members send zeros).
        for name, curve in (("eager", eager), ("graph", graph)):
            have = len(curve["us"])
            t = torch.tensor(curve["us"] + [0.0] * (len(sizes) - have), dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            curve["us"] = [round(v, 3) for v in t.tolist()[:have]]
            out[name][str(n)] = curve
    if rank == 0:
        Path(result_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    os.environ.update(MULTICAST_OFF)
    world = 2 if args.smoke else (args.gpus or torch.cuda.device_count())
    if world < 2:
        raise SystemExit(f"need at least 2 GPUs, found {world}")
    result = Path(args.out) / ".allreduce_raw.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.UTC)
    mp.spawn(_worker, args=(world, args, _free_port(), str(result)), nprocs=world, join=True)
    raw = json.loads(result.read_text())
    result.unlink()
    topo = ""
    if not args.smoke:
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            topo = f"nvidia-smi topo failed: {exc}"
    names = [torch.cuda.get_device_name(i) for i in range(world)] if not args.smoke else ["cpu"] * world
    # Fit on graph replay (what decode pays); eager where graphs failed.
    fit_curves = raw["graph"] if raw["graph"] and all(c["us"] for c in raw["graph"].values()) else raw["eager"]
    fit_basis = "graph" if fit_curves is raw["graph"] else "eager"
    table = {
        "kind": "nccl all-reduce profile",
        "gpu_names": names,
        "gpu_key": "cpu" if args.smoke else ("h200" if "H200" in names[0] else "h100" if "H100" in names[0] else "gpu"),
        "gpus": world,
        "date": started.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if not args.smoke else None,
        "env": {k: os.environ.get(k) for k in MULTICAST_OFF},
        "message": f"tokens x {HIDDEN} x bf16 ({DTYPE_BYTES} B)",
        "topology": topo,
        "measured_basis": fit_basis,
        "measured": fit_curves,
        "measured_eager": raw["eager"],
        "measured_graph": raw["graph"],
        "graph_error": raw["graph_error"],
        "not_measured": [n for n in EXTRAPOLATE_TO if str(n) not in fit_curves],
    }
    table.update(build_table(fit_curves))
    return table


def measure_local(args: argparse.Namespace) -> dict[str, Any]:
    """The parts of vLLM's all-reduce paths that one GPU can time, per message of
    `tokens x 12288 x bf16`, each call replayed 20 times from a CUDA graph:

    - add_rmsnorm_us: residual add + RMSNorm (torch.compile fuses it into one kernel, as
      vLLM's fused_add_rms_norm is one): the kernel that FlashInfer's fused all-reduce +
      RMSNorm removes from the step;
    - copy_in_out_us: two device copies of the message, the copy into and out of the
      symmetric buffer that vLLM's symm-mem all-reduce pays (symm_mem.py);
    - kernel_floor_us: one tiny kernel inside a graph (launch + tail): what any extra
      kernel costs a step.
    """
    import torch

    smoke = bool(args.smoke)
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hidden = 64 if smoke else HIDDEN
    sizes = [1, 16] if smoke else DECODE_TOKENS + PREFILL_TOKENS
    calls = 20

    def add_rmsnorm(x: Any, r: Any, w: Any) -> Any:
        r = r + x
        rf = r.float()
        return (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w, r

    fused = add_rmsnorm
    mode = "eager"
    if device.type == "cuda":
        try:
            fused = torch.compile(add_rmsnorm, dynamic=True)
            mode = "torch.compile(dynamic=True)"
        except Exception:  # noqa: BLE001 - eager kernels then, and the JSON says so
            fused = add_rmsnorm

    def time_us(fn: Any) -> float:
        fn()
        fn()
        if device.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) * 1e6 / calls
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(samples)

    tiny = torch.zeros(1, device=device, dtype=dtype)
    floor = time_us(lambda: tiny.add_(1))
    norm_us: list[float] = []
    copy_us: list[float] = []
    nbytes: list[int] = []
    w = torch.ones(hidden, device=device, dtype=dtype)
    for tokens in sizes:
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        r = torch.randn_like(x)
        buf, out = torch.empty_like(x), torch.empty_like(x)
        norm_us.append(round(time_us(lambda x=x, r=r: fused(x, r, w)), 3))
        copy_us.append(round(time_us(lambda x=x, buf=buf, out=out: (buf.copy_(x), out.copy_(buf))), 3))
        nbytes.append(x.numel() * x.element_size())
        print(f"tokens={tokens:5d} add+rmsnorm {norm_us[-1]:8.2f} us  copy in+out {copy_us[-1]:8.2f} us", flush=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return {
        "kind": "all-reduce local parts (one GPU)",
        "gpu_name": name,
        "gpu_key": "h200" if "H200" in name else ("h100" if "H100" in name else device.type),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "elementwise": mode,
        "calls_per_graph": calls,
        "message": f"tokens x {hidden} x {str(dtype).removeprefix('torch.')}",
        "tokens": sizes,
        "bytes": nbytes,
        "add_rmsnorm_us": norm_us,
        "copy_in_out_us": copy_us,
        "kernel_floor_us": round(floor, 3),
    }


def print_table(table: dict[str, Any]) -> None:
    fit = table["fit"]
    print(
        f"\nfit: alpha {fit['alpha_us']} us/step, beta {fit['beta_gbps']} GB/s/link, "
        f"max rel error {fit['max_rel_error']:.1%} (on TP {fit['fitted_on']})"
    )
    print(f"{'tp':>3} {'tokens':>7} {'bytes':>10} {'us':>10} {'fit us':>10}  source   per 88-layer step (2/layer)")
    for r in table["table"]:
        print(
            f"{r['tp']:>3} {r['tokens']:>7} {r['bytes']:>10} {r['us']:>10.2f} {r['fit_us']:>10.2f}  "
            f"{r['source']:<12} {2 * 88 * r['us'] / 1e3:7.2f} ms"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all visible)")
    parser.add_argument("--trials", type=int, default=7, help="median over this many timed trials")
    parser.add_argument("--smoke", action="store_true", help="2 CPU processes over gloo: checks the script only")
    parser.add_argument("--refit", type=Path, help="recompute fit and table of an existing JSON, no measuring")
    parser.add_argument("--local", action="store_true", help="one GPU: time the memory-bound parts (measure_local)")


def run(args: argparse.Namespace) -> int:
    if args.refit:
        table = json.loads(args.refit.read_text())
        table.update(build_table(table["measured"]))
        args.refit.write_text(json.dumps(table, indent=1) + "\n")
        print_table(table)
        return 0
    if args.local:
        local = measure_local(args)
        path = Path(args.out) / f"allreduce_local_{local['gpu_key']}.json"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(local, indent=1) + "\n")
        print(f"kernel floor {local['kernel_floor_us']} us; wrote {path}")
        return 0
    table = measure(args)
    path = Path(args.out) / f"allreduce_{table['gpu_key']}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print_table(table)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
