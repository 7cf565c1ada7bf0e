"""`cluster bench engine-load`: how long one pool's vLLM engine takes to start, with and
without the faster-start options (engine.stream_weights: the runai_streamer load format;
engine.compile_cache: a persistent VLLM_CACHE_ROOT), measured on this machine.

Each variant starts a real engine (vLLM's offline `LLM`, the pool's engine arguments from
the typed config) in a fresh process, so nothing is warm in memory, and reports: the
time to the engine being ready (process start to `LLM` built), to the first token of one
request, and vLLM's own figures from its log (weight loading, model loading, torch.compile).
These measure the inputs of the cold-start model (ColdStartConfig: weight GB/s, engine
start). `compiled-cold` starts with an empty cache root and `compiled-warm` with the one
`compiled-cold` filled (the pool compiled with `enforce_eager: false`). `streamed-s3`
uploads the model folder to an S3-compatible server (`--s3-endpoint`, or moto's server
started from `--moto-python`, a venv of its own) and streams it from there:
`model.source: s3://...` with `model.object_store.endpoint_url`, as a cluster would. It
needs boto3 and runai-model-streamer-s3 beside vLLM; their botocore pins a
python-dateutil older than the one kubernetes needs, so they live in a side venv layered
over the project's (`make bench-engine-load-s3` builds it and the server's venv).

Starts engines: on a shared machine run it where nothing else does (the e2e lock).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VARIANTS = ("default", "streamed", "compiled-cold", "compiled-warm", "streamed-compiled-warm", "streamed-s3")
S3_BUCKET = "mls-engine-load"
# vLLM 0.29 log lines with its own timings (seconds).
LOG_FIGURES = {
    "weights_s": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    # The whole model load (the streamer's too; its loader logs no "Loading weights").
    "model_load_s": re.compile(r"Model loading took [0-9.]+ GiB memory and ([0-9.]+) seconds"),
    "stream_s": re.compile(r"\[RunAI Streamer\] Overall time to stream .*?: ([0-9.]+)s,"),
    "compile_s": re.compile(r"torch\.compile (?:and initial profiling/warmup run together )?took ([0-9.]+) s in total"),
    "engine_init_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu-tiny")
    p.add_argument("--config", help="a ClusterConfig YAML instead of --profile")
    p.add_argument("--pool", default="standard")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant (medians reported)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per engine start")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--s3-endpoint", help="streamed-s3: an S3-compatible server (credentials from AWS_* env)")
    p.add_argument("--moto-python", help="streamed-s3: start moto's S3 server with this interpreter (its own venv)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="no engine: time reading the weights per load path (default, streamed, streamed-s3 of --variants)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one engine start, JSON on stdout


def variant_config(cfg: Any, pool_name: str, variant: str, cache_dir: str, s3: tuple[str, str] | None = None) -> Any:
    """A copy of the config whose pool starts the way `variant` says; `s3` (source URI,
    endpoint) for streamed-s3."""
    out = cfg.model_copy(deep=True)
    e = out.pool(pool_name).engine
    e.stream_weights.enabled = variant.startswith("streamed")
    if variant == "streamed-s3":
        if s3 is None:
            raise ValueError("streamed-s3 needs --s3-endpoint or --moto-python")
        out.model.source, out.model.object_store.endpoint_url = s3
        for p in out.pools:  # config validation: a URI source needs every pool streaming
            p.engine.stream_weights.enabled = True
    compiled = "compiled" in variant
    e.compile_cache.enabled = compiled
    e.compile_cache.dir = cache_dir
    if compiled:
        e.enforce_eager = False
    return type(cfg).model_validate(out.model_dump())


def _engine_args(cfg: Any, pool: Any) -> dict[str, Any]:
    """The pool's engine kwargs that vLLM's EngineArgs takes (the OpenAI server's own
    options, e.g. the tool-call parser, do not apply to an offline engine)."""
    from vllm.engine.arg_utils import EngineArgs

    from deployments.app import engine_kwargs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    return {k: v for k, v in engine_kwargs(cfg, pool).items() if k in fields}


def _child(args: argparse.Namespace) -> int:
    """One engine start in this process; prints one JSON line."""
    t0 = float(os.environ["MLS_ENGINE_LOAD_T0"])
    from cluster.config import ClusterConfig
    from cluster.tiny_model import resolve_model_source

    cfg = ClusterConfig.model_validate_json(os.environ["MLS_ENGINE_LOAD_CONFIG"])
    pool = cfg.pool(args.pool)
    from vllm import LLM, SamplingParams

    t_import = time.time() - t0
    llm = LLM(model=resolve_model_source(cfg.model.source, cfg.model.architecture), **_engine_args(cfg, pool))
    t_ready = time.time() - t0
    llm.generate(["Hello"], SamplingParams(max_tokens=1), use_tqdm=False)
    t_first = time.time() - t0
    print("ENGINE_LOAD " + json.dumps({"import_s": t_import, "ready_s": t_ready, "first_token_s": t_first}), flush=True)
    return 0


def start_once(
    cfg: Any, pool: str, variant: str, cache_dir: str, timeout_s: float, s3: tuple[str, str] | None = None
) -> dict[str, Any]:
    """One fresh process starting the engine; its timings and vLLM's log figures."""
    from deployments.serve_config import engine_env

    vcfg = variant_config(cfg, pool, variant, cache_dir, s3)
    env = {**os.environ, **engine_env(vcfg, vcfg.pool(pool))}
    if "compiled" not in variant:
        env.pop("VLLM_CACHE_ROOT", None)
    if variant.startswith("streamed"):
        # The streamer's own "Overall time to stream" line (else dropped: vLLM configures
        # only its own loggers); the streamed variants' counterpart of "Loading weights".
        env.setdefault("RUNAI_STREAMER_LOG_TO_STDERR", "1")
    env["MLS_ENGINE_LOAD_CONFIG"] = vcfg.model_dump_json()
    env["MLS_ENGINE_LOAD_T0"] = repr(time.time())
    cmd = [sys.executable, "-m", "bench.calibration.engine_load", "--child", "1", "--pool", pool]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"no engine within {timeout_s:.0f} s"}
    out: dict[str, Any] = {"variant": variant}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ENGINE_LOAD ")), None)
    if proc.returncode != 0 or line is None:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-6:]
        out["error"] = " | ".join(tail) or f"exit {proc.returncode}"
        return out
    out.update(json.loads(line[len("ENGINE_LOAD ") :]))
    # The engine's own part: from vLLM imported to ready (imports vary with the page cache).
    out["engine_s"] = out["ready_s"] - out["import_s"]
    log = proc.stdout + proc.stderr
    for key, pattern in LOG_FIGURES.items():
        found = pattern.findall(log)
        if found:
            out[key] = sum(float(x) for x in found)
    return out


@contextlib.contextmanager
def _s3_model(cfg: Any, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(s3:// source, endpoint) of the pool's model folder uploaded to an S3-compatible
    server: `--s3-endpoint`, or moto's server from `--moto-python` for the duration."""
    from bench.calibration.s3_server import moto_server, upload_folder
    from cluster.tiny_model import resolve_model_source

    folder = Path(resolve_model_source(cfg.model.source, cfg.model.architecture))
    with contextlib.ExitStack() as stack:
        if args.s3_endpoint:
            endpoint = args.s3_endpoint
        elif args.moto_python:
            endpoint = stack.enter_context(moto_server(args.moto_python))
        else:
            raise ValueError("streamed-s3 needs --s3-endpoint or --moto-python")
        seconds = upload_folder(folder, endpoint, S3_BUCKET, folder.name)
        print(f"  uploaded {folder.name} to {endpoint} in {seconds:.1f} s", flush=True)
        yield f"s3://{S3_BUCKET}/{folder.name}", endpoint


def _weights_only(cfg: Any, args: argparse.Namespace, variants: list[str]) -> int:
    """bench/calibration/weight_read.py on the pool's model: the load paths of the variants."""
    from bench.calibration.weight_read import format_row, measure, safetensors_file
    from cluster.tiny_model import resolve_model_source

    folder = Path(resolve_model_source(cfg.model.source, cfg.model.architecture))
    local = str(safetensors_file(folder))
    by_variant = {"default": ("safetensors", local), "streamed": ("streamer-disk", local)}
    files = dict(by_variant[v] for v in variants if v in by_variant)
    print(f"weight read of {local} ({Path(local).stat().st_size / 1e6:.1f} MB), {args.repeat} run(s) per path")
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if "streamed-s3" in variants:
            uri, endpoint = stack.enter_context(_s3_model(cfg, args))
            files["streamer-s3"] = f"{uri}/{Path(local).name}"
            env = cfg.model.object_store.model_copy(update={"endpoint_url": endpoint}).engine_env(uri)
        rows = measure(files, env, args.repeat, args.timeout_s)
    for row in rows:
        print(format_row(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": cfg.profile, "weight_read": rows}, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def run(args: argparse.Namespace) -> int:
    if args.child:
        return _child(args)
    from cluster.config import ClusterConfig
    from cluster.profiles import load_profile

    cfg = ClusterConfig.from_file(args.config) if args.config else load_profile(args.profile)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"error: unknown variants {bad}; known: {VARIANTS}", file=sys.stderr)
        return 2
    pool = cfg.pool(args.pool)
    if args.weights_only:
        return _weights_only(cfg, args, variants)
    print(
        f"engine start of pool {pool.name} ({cfg.profile}, model {cfg.model.source}, "
        f"checkpoint format {cfg.model.load_format}); {args.repeat} run(s) per variant"
    )
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm-compile-cache-"))
        s3 = stack.enter_context(_s3_model(cfg, args)) if "streamed-s3" in variants else None
        for variant in variants:
            # compiled-cold always starts from an empty cache; the warm ones reuse it.
            runs = []
            for _ in range(max(1, args.repeat)):
                if variant == "compiled-cold":
                    for child in Path(cache).iterdir():
                        subprocess.run(["rm", "-rf", str(child)], check=True)
                runs.append(start_once(cfg, pool.name, variant, cache, args.timeout_s, s3))
            ok = [r for r in runs if "error" not in r]
            row: dict[str, Any] = {"variant": variant, "runs": len(runs), "failed": len(runs) - len(ok)}
            if not ok:
                row["error"] = runs[-1]["error"]
            for key in ("ready_s", "first_token_s", "import_s", "engine_s", *LOG_FIGURES):
                vals = [r[key] for r in ok if key in r]
                if vals:
                    row[key] = _median(vals)
            rows.append(row)
            print(_format_row(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": cfg.profile, "pool": pool.name, "rows": rows}, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


def _format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['variant']:24s} FAILED: {row['error']}"

    def f(key: str) -> str:
        return f"{row[key]:6.1f} s" if key in row else "     - "

    return (
        f"  {row['variant']:24s} ready {f('ready_s')}  first token {f('first_token_s')}  "
        f"(imports {f('import_s')}, engine build {f('engine_s')}, model load {f('model_load_s')}, "
        f"weights {f('weights_s')}, streamer {f('stream_s')}, "
        f"torch.compile {f('compile_s')}, engine init {f('engine_init_s')})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engine_load")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
