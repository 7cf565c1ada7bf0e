"""How long a model folder's safetensors take to read into CPU tensors, per load path, without
starting an engine: safetensors' own reader (what vLLM's default loader uses), the Run:ai
model streamer from the folder (`load_format: runai_streamer`) and the streamer from an
s3:// copy of the folder (`model.source: s3://...`). `cluster bench engine-load
--weights-only` runs it; the engine-start variants measure the same paths inside a whole
start, where on a small model the read is lost in the noise of the rest.

Each read runs in a fresh process (nothing of the streamer's or torch's state is shared),
`repeat` times; the local reads come from the page cache after the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PATHS = ("safetensors", "streamer-disk", "streamer-s3")


def read_once(path: str, source: str) -> dict[str, float]:
    """In this process: read every tensor of `source` (a .safetensors file or its s3:// URI)
    the way `path` says; seconds and bytes."""
    import torch

    torch.set_num_threads(1)  # the copies are memory-bound; OpenMP threads only spin on a shared box
    started = time.perf_counter()
    size = 0
    if path == "safetensors":
        from safetensors.torch import load_file

        for tensor in load_file(source).values():
            t = tensor.clone()  # load_file maps the file: touch every byte, as building the model does
            size += t.numel() * t.element_size()
    else:
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_file(source)
            for _, tensor in streamer.get_tensors():
                t = tensor.clone()  # as vLLM's iterator does: the streamer reuses its buffer
                size += t.numel() * t.element_size()
    return {"seconds": time.perf_counter() - started, "bytes": float(size)}


def measure(files: dict[str, str], env: dict[str, str], repeat: int, timeout_s: float) -> list[dict[str, Any]]:
    """Per load path (its source in `files`): the median of `repeat` fresh-process reads."""
    rows: list[dict[str, Any]] = []
    for path, source in files.items():
        runs: list[dict[str, float]] = []
        error = None
        for _ in range(max(1, repeat)):
            cmd = [sys.executable, "-m", "bench.calibration.weight_read", path, source]
            proc = subprocess.run(
                cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s, check=False
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WEIGHT_READ ")), None)
            if proc.returncode != 0 or line is None:
                error = (
                    " | ".join([ln for ln in proc.stderr.splitlines() if ln.strip()][-4:]) or f"exit {proc.returncode}"
                )
                break
            runs.append(json.loads(line[len("WEIGHT_READ ") :]))
        row: dict[str, Any] = {"path": path, "source": source, "runs": len(runs)}
        if error is not None:
            row["error"] = error
        if runs:
            seconds = sorted(r["seconds"] for r in runs)
            row["seconds_median"] = seconds[len(seconds) // 2]
            row["seconds_min"] = seconds[0]
            row["mb"] = runs[0]["bytes"] / 1e6
            row["mb_per_s"] = row["mb"] / row["seconds_median"] if row["seconds_median"] > 0 else 0.0
        rows.append(row)
    return rows


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['path']:14s} FAILED: {row['error']}"
    return (
        f"  {row['path']:14s} {row['mb']:6.1f} MB in {row['seconds_median']:6.3f} s median "
        f"(min {row['seconds_min']:.3f} s, {row['runs']} runs): {row['mb_per_s']:7.1f} MB/s"
    )


def main(argv: list[str]) -> int:
    """Child: `python -m bench.calibration.weight_read PATH SOURCE` prints one JSON line."""
    path, source = argv
    if path not in PATHS:
        raise SystemExit(f"unknown load path {path!r}; known: {', '.join(PATHS)}")
    print("WEIGHT_READ " + json.dumps(read_once(path, source)), flush=True)
    return 0


def safetensors_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{folder}: expected one .safetensors file, found {len(files)}")
    return files[0]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
