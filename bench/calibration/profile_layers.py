"""Time Mistral Large 2 layer shapes as one GPU of a tensor-parallel replica sees them.

Self-contained (PyTorch only, no vLLM, no project imports) so it runs as-is on a bare GPU
machine:

    python3 bench/calibration/profile_layers.py --tp 8 --weights bf16 --out DIR
    python3 bench/calibration/profile_layers.py --smoke --out DIR      # tiny shapes on CPU, seconds

Per GPU of a TP=N replica: 96/N query heads, max(1, 8/N) KV heads of 128, hidden 12288,
intermediate 28672/N, vocab 32768/N. What it measures, per layer (all-reduces excluded:
bench/calibration/profile_allreduce.py measures those):

- dense_ms[T]: RMSNorm, QKV, RoPE, O, RMSNorm, gate/up, SiLU*mul, down for T tokens, the
  elementwise work compiled with torch.compile (as vLLM compiles it) where that works,
  the layer sequence captured in a CUDA graph and replayed;
- decode_attn_ms[batch][context]: KV-cache write and attention of `batch` sequences of one
  new token over `context` cached tokens, in a CUDA graph;
- decode_layer_ms[batch][context]: the whole decode layer (dense + attention) in one CUDA
  graph, as vLLM replays its decode graphs; compared with the HBM floor;
- prefill_attn_ms[chunk][context]: causal attention of a chunk of new tokens over cached
  context (lower-right causal mask, as chunked prefill needs);
- lm_head_ms[S]: final norm and LM head for S sampled sequences.

Each graph holds several distinct layers (own weights, own KV) so the L2 cache never holds
what the next replay reads. FP8 weights (--weights fp8) run through torch._scaled_mm with
per-tensor scales and static activation quantization, as vLLM's fp8 checkpoints do.
Attention runs through torch SDPA's FlashAttention-2 and memory-efficient kernels; each
cell keeps the faster, and the JSON says which ran.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

FP8_MAX = 448.0  # float8_e4m3fn


@dataclass(frozen=True)
class Shapes:
    """One GPU's share of a Mistral Large 2 layer."""

    tp: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers_total: int

    @classmethod
    def mistral_large_2(cls, tp: int) -> Shapes:
        if 96 % tp:
            raise SystemExit(f"96 query heads do not divide over TP={tp}")
        return cls(tp, 12288, 96 // tp, max(1, 8 // tp), 128, 28672 // tp, 32768 // tp, 88)

    @classmethod
    def smoke(cls) -> Shapes:
        return cls(1, 256, 8, 2, 32, 512, 1024, 4)

    def layer_weight_params(self) -> int:
        q = self.q_heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    def kv_bytes_per_token_layer(self, kv_bytes: int = 2) -> int:
        return self.kv_heads * self.head_dim * 2 * kv_bytes


@dataclass(frozen=True)
class Grids:
    dense_tokens: list[int]
    decode_batch: list[int]
    decode_context: list[int]
    decode_max_kv_tokens: int  # cap on batch x context (memory)
    prefill_chunk: list[int]
    prefill_context: list[int]
    lm_tokens: list[int]
    layers_in_graph: int
    reps: int

    @classmethod
    def full(cls) -> Grids:
        return cls(
            dense_tokens=[
                1,
                2,
                4,
                8,
                16,
                32,
                48,
                64,
                96,
                128,
                192,
                256,
                384,
                512,
                768,
                1024,
                1536,
                2048,
                3072,
                4096,
                6144,
                8192,
            ],
            decode_batch=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            decode_context=[512, 2048, 8192, 32768, 131072],
            decode_max_kv_tokens=2**21,
            prefill_chunk=[16, 64, 256, 512, 1024, 2048, 4096, 8192],
            prefill_context=[0, 2048, 8192, 32768, 122880],
            lm_tokens=[1, 8, 32, 64, 128, 256, 512],
            layers_in_graph=4,
            reps=15,
        )

    @classmethod
    def smoke(cls) -> Grids:
        return cls([1, 4, 16, 64], [1, 4, 16], [64, 256], 2048, [16, 64], [0, 128], [1, 16], 2, 3)


# ---------------------------------------------------------------------------------------
# Layer pieces. Written as plain functions so torch.compile can fuse the elementwise work.


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding on (T, heads, D) with cos/sin of shape (T, 1, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, fp8: bool) -> torch.Tensor:
    """y = x W^T in bf16, or fp8 x fp8 -> bf16 through torch._scaled_mm (W stored (out, in)
    row-major, so W^T is the column-major operand cuBLASLt wants)."""
    if not fp8:
        return F.linear(x, w)
    xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)


def pre_attn(
    x: torch.Tensor,
    residual: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n1: torch.Tensor,
    w_qkv: torch.Tensor,
    xs: torch.Tensor,
    ws: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused add + RMSNorm, QKV projection, RoPE (vLLM's piece before attention)."""
    residual = residual + x
    qkv = linear(rms_norm(residual, n1), w_qkv, xs, ws, fp8)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    t = x.shape[0]
    q = rope(q.reshape(t, q_heads, head_dim), cos, sin)
    k = rope(k.reshape(t, kv_heads, head_dim), cos, sin)
    return q, k, v.reshape(t, kv_heads, head_dim), residual


def post_attn(
    attn: torch.Tensor,
    residual: torch.Tensor,
    n2: torch.Tensor,
    w_o: torch.Tensor,
    xs_o: torch.Tensor,
    ws_o: torch.Tensor,
    w_gu: torch.Tensor,
    xs_gu: torch.Tensor,
    ws_gu: torch.Tensor,
    w_d: torch.Tensor,
    xs_d: torch.Tensor,
    ws_d: torch.Tensor,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O projection, add + RMSNorm, gate/up, SiLU*mul, down (the piece after attention)."""
    o = linear(attn, w_o, xs_o, ws_o, fp8)  # tensor-parallel all-reduce here in vLLM
    residual = residual + o
    gu = linear(rms_norm(residual, n2), w_gu, xs_gu, ws_gu, fp8)
    g, u = gu.chunk(2, dim=-1)
    d = linear(F.silu(g) * u, w_d, xs_d, ws_d, fp8)  # and here
    return d, residual


class Weight:
    """One projection's weight (bf16 or fp8 with its per-tensor scale) and the static
    activation scale fp8 checkpoints carry."""

    def __init__(self, out_f: int, in_f: int, fp8: bool, device: torch.device) -> None:
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) / math.sqrt(in_f)
        if fp8:
            self.w_scale = (w.abs().amax().float() / FP8_MAX).reshape(())
            self.w = (w.float() / self.w_scale).to(torch.float8_e4m3fn)
            del w
        else:
            self.w_scale = torch.ones((), device=device)
            self.w = w
        self.x_scale = torch.tensor(4.0 / FP8_MAX, device=device)

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w, self.x_scale, self.w_scale


class Layer:
    """One layer's weights on one GPU; `pre` and `post` are the (compiled or eager)
    functions shared by all layers, so torch.compile compiles each once."""

    pre: Callable[..., Any] = staticmethod(pre_attn)
    post: Callable[..., Any] = staticmethod(post_attn)

    def __init__(self, s: Shapes, fp8: bool, device: torch.device) -> None:
        self.s = s
        self.fp8 = fp8
        q, kv = s.q_heads * s.head_dim, s.kv_heads * s.head_dim
        self.qkv = Weight(q + 2 * kv, s.hidden, fp8, device)
        self.o = Weight(s.hidden, q, fp8, device)
        self.gate_up = Weight(2 * s.intermediate, s.hidden, fp8, device)
        self.down = Weight(s.hidden, s.intermediate, fp8, device)
        self.n1 = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.n2 = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)

    def pre_attn(
        self, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        return Layer.pre(x, residual, cos, sin, self.n1, *self.qkv.args(), s.q_heads, s.kv_heads, s.head_dim, self.fp8)

    def post_attn(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return Layer.post(attn, residual, self.n2, *self.o.args(), *self.gate_up.args(), *self.down.args(), self.fp8)


# ---------------------------------------------------------------------------------------
# Attention through SDPA.

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# The Hopper-class kernel: cuDNN's fused attention runs on sm90 at FlashAttention-3 rates
# (vLLM runs FA3 there, v1/attention/backends/fa_utils.py); FA2 and efficient reach half.
HOPPER_BACKEND = "cudnn"


def decode_attention(backend: str, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
    """q (B, q_heads, D); caches (B, kv_heads, ctx, D). The query heads of one KV group are
    folded into the query-length axis, so each KV head is read once (flash-decoding's GQA
    trick; vLLM's FlashAttention does the same for decode)."""
    b, qh, d = q.shape
    kvh = kc.shape[1]
    qf = q.reshape(b, kvh, qh // kvh, d)
    with sdpa_kernel(BACKENDS[backend]):
        out = F.scaled_dot_product_attention(qf, kc, vc)
    return out.reshape(b, qh * d)


def prefill_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (1, H, chunk, D) over k, v (1, H or KV heads, ctx + chunk, D): causal aligned
    bottom-right (the chunk's last query sees everything), as chunked prefill needs."""
    chunk, total = q.shape[2], k.shape[2]
    gqa: dict[str, Any] = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    with sdpa_kernel(BACKENDS[backend]):
        if chunk == total:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        if backend == "cudnn":
            return _split_prefill(q, k, v, gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(chunk, total), **gqa)


def _split_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: dict[str, Any]) -> torch.Tensor:
    """Chunked prefill for a backend that SDPA gives no bottom-right mask (CausalBias
    dispatches only flash and efficient): the chunk over the cached context (no mask) plus
    the chunk over itself (square causal), the FLOPs and bytes of the bottom-right mask.
    A timing stand-in: the two halves are summed by one elementwise kernel where an exact
    merge would weight them by their log-sum-exp (SDPA does not return it); FA3 does all
    of it in one kernel, so this time bounds the real one from above."""
    ctx = k.shape[2] - q.shape[2]
    a = F.scaled_dot_product_attention(q, k[:, :, :ctx], v[:, :, :ctx], **gqa)
    b = F.scaled_dot_product_attention(q, k[:, :, ctx:], v[:, :, ctx:], is_causal=True, **gqa)
    return a + b


# ---------------------------------------------------------------------------------------
# Timing.


class Timer:
    def __init__(self, device: torch.device, reps: int, use_graphs: bool) -> None:
        self.device = device
        self.reps = reps
        self.use_graphs = use_graphs and device.type == "cuda"
        self.graph_failures: list[str] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any], reps: int | None = None) -> float:
        """Median over reps of one call of fn; a CUDA graph of fn when graphs are on."""
        reps = reps or self.reps
        fn()  # warm-up: compilation, handles, allocations outside the timed region
        fn()
        self.sync()
        runner = fn
        graph = None
        if self.use_graphs:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                runner = graph.replay
                runner()
            except RuntimeError as exc:  # time eagerly rather than lose the cell
                self.graph_failures.append(str(exc)[:160])
                graph, runner = None, fn
                self.sync()
        self.sync()
        samples = []
        if self.device.type == "cuda":
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runner()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                runner()
                samples.append((time.perf_counter() - t0) * 1e3)
        del graph
        return statistics.median(samples)


# ---------------------------------------------------------------------------------------


class Profiler:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = bool(args.smoke)
        self.device = torch.device("cuda" if torch.cuda.is_available() and not self.smoke else "cpu")
        self.s = Shapes.smoke() if self.smoke else Shapes.mistral_large_2(args.tp)
        self.g = Grids.smoke() if self.smoke else Grids.full()
        self.fp8 = args.weights == "fp8"
        self.deadline = time.monotonic() + args.budget_s
        torch.manual_seed(0)
        n = self.g.layers_in_graph
        self.layers = [Layer(self.s, self.fp8, self.device) for _ in range(n)]
        s = self.s
        self.lm_w = torch.randn(s.vocab, s.hidden, device=self.device, dtype=torch.bfloat16) / math.sqrt(s.hidden)
        self.norm_f = torch.ones(s.hidden, device=self.device, dtype=torch.bfloat16)
        self.timer = Timer(self.device, self.g.reps, use_graphs=not args.no_graphs)
        self.compile_mode = "eager"
        if args.compile and self.device.type == "cuda":
            self._try_compile()
        self.backends = self._available_backends()
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def _try_compile(self) -> None:
        """Compile the pieces before and after attention as vLLM's piecewise graphs do:
        dynamic token count, elementwise work fused into Triton kernels, GEMMs to cuBLAS."""
        try:
            t0 = time.monotonic()
            Layer.pre = staticmethod(torch.compile(pre_attn, dynamic=True))
            Layer.post = staticmethod(torch.compile(post_attn, dynamic=True))
            for tokens in (1, 2, 64):  # 0/1 specialization: compile the 1-token graph too
                x, cos, sin = self._inputs(tokens)
                for layer in self.layers:
                    q, _, _, r = layer.pre_attn(x, x, cos, sin)
                    layer.post_attn(q.reshape(tokens, -1), r)
            self.sync()
            self.compile_mode = "torch.compile(dynamic=True)"
            self.log(f"torch.compile ready in {time.monotonic() - t0:.0f}s")
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: measure eager
            Layer.pre = staticmethod(pre_attn)
            Layer.post = staticmethod(post_attn)
            self.log(f"torch.compile failed ({type(exc).__name__}: {exc}); eager elementwise kernels")
            self.compile_mode = f"eager (compile failed: {type(exc).__name__})"

    def sync(self) -> None:
        self.timer.sync()

    def _available_backends(self) -> list[str]:
        """Backends that run both attention shapes and agree with the math kernel. Also
        records which run prefill with the cache's own KV heads (GQA, as vLLM's kernels
        read them) rather than K/V expanded to every query head."""
        found: list[str] = []
        s = self.s
        torch.manual_seed(1)
        q = torch.randn(2, s.q_heads, s.head_dim, device=self.device, dtype=torch.bfloat16)
        kc = torch.randn(2, s.kv_heads, 64, s.head_dim, device=self.device, dtype=torch.bfloat16)
        qp = torch.randn(1, s.q_heads, 48, s.head_dim, device=self.device, dtype=torch.bfloat16)
        kg = torch.randn(1, s.kv_heads, 48, s.head_dim, device=self.device, dtype=torch.bfloat16)
        kp = kg.repeat_interleave(s.q_heads // s.kv_heads, dim=1)
        ref_d = decode_attention("math", q, kc, kc)
        ref_p = prefill_attention("math", qp, kp, kp)
        self.gqa_native: set[str] = set()
        for name in ("flash", "efficient", "cudnn", "math"):
            if name == "math" and found:
                continue
            try:
                ok = torch.allclose(decode_attention(name, q, kc, kc).float(), ref_d.float(), atol=2e-2)
                ok = ok and torch.allclose(prefill_attention(name, qp, kp, kp).float(), ref_p.float(), atol=2e-2)
                prefill_attention(name, qp[:, :, :16], kp, kp)  # the chunked (ctx > 0) path runs
            except RuntimeError as exc:
                self.log(f"attention backend {name} unavailable: {str(exc)[:120]}")
                continue
            if not ok:
                self.log(f"attention backend {name} disagrees with the math kernel; left out")
                continue
            found.append(name)
            try:
                if torch.allclose(prefill_attention(name, qp, kg, kg).float(), ref_p.float(), atol=2e-2):
                    self.gqa_native.add(name)
            except RuntimeError:
                pass
        self.log(f"attention backends: {found}; GQA-native prefill: {sorted(self.gqa_native)}")
        return found

    def _inputs(self, tokens: int, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.s
        x = torch.randn(tokens, s.hidden, device=self.device, dtype=torch.bfloat16)
        ang = torch.rand(tokens, 1, s.head_dim // 2, device=self.device) * 6.28 + pos
        return x, ang.cos(), ang.sin()

    # -- measurements ------------------------------------------------------------------

    def ceilings(self) -> dict[str, float | None]:
        """HBM copy (read + write) and read-only bandwidth and the bf16 GEMM rate, as
        a steady measurement needs, after a second of GEMMs so the clocks have left idle."""
        if self.device.type != "cuda":
            return {"hbm_copy_gbps": None, "hbm_read_gbps": None, "bf16_gemm_tflops": None}
        a = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16)
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            for _ in range(20):
                a @ b
            self.sync()
        ms = self.timer.time_ms(lambda: a @ b, reps=20)
        tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
        n = 1 << 30  # 2 GiB of bf16
        src = torch.randn(n, device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = self.timer.time_ms(lambda: dst.copy_(src), reps=20)
        copy = 2 * n * 2 / (ms * 1e-3) / 1e9
        acc = torch.empty((), device=self.device, dtype=torch.float32)
        ms = self.timer.time_ms(lambda: torch.sum(src, dim=0, dtype=torch.float32, out=acc), reps=20)
        read = n * 2 / (ms * 1e-3) / 1e9
        return {"hbm_copy_gbps": round(copy, 1), "hbm_read_gbps": round(read, 1), "bf16_gemm_tflops": round(tflops, 1)}

    def dense(self) -> dict[str, list[Any]]:
        tokens_done: list[int] = []
        ms_done: list[float] = []
        n = len(self.layers)
        for t in self.g.dense_tokens:
            if self.out_of_time():
                self.notes.append(f"dense grid cut at {t} tokens by the time budget")
                break
            x, cos, sin = self._inputs(t)
            res = torch.zeros_like(x)

            def run(
                x: torch.Tensor = x,
                res: torch.Tensor = res,
                cos: torch.Tensor = cos,
                sin: torch.Tensor = sin,
                t: int = t,
            ) -> None:
                h, r = x, res
                for layer in self.layers:
                    q, _, _, r = layer.pre_attn(h, r, cos, sin)
                    h, r = layer.post_attn(q.reshape(t, -1), r)

            ms = self.timer.time_ms(run) / n
            tokens_done.append(t)
            ms_done.append(round(ms, 5))
            self.log(f"dense T={t:5d}: {ms:.4f} ms/layer")
        return {"tokens": tokens_done, "ms": ms_done}

    def decode(self, whole_layer: bool = True) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Attention-only and whole-layer decode graphs over (batch, context); the last
        item holds every backend's attention time per cell."""
        s, g = self.s, self.g
        n = len(self.layers)
        cap = g.decode_max_kv_tokens
        # One KV buffer per layer, as large as the cap; each cell views a prefix of it.
        per_tok = s.kv_heads * s.head_dim
        kbufs = [torch.randn(cap * per_tok, device=self.device, dtype=torch.bfloat16) for _ in range(n)]
        vbufs = [torch.randn(cap * per_tok, device=self.device, dtype=torch.bfloat16) for _ in range(n)]
        attn_ms: list[list[float | None]] = []
        layer_ms: list[list[float | None]] = []
        winner: list[list[str | None]] = []
        each: dict[str, list[list[float | None]]] = {name: [] for name in self.backends}
        for b in g.decode_batch:
            arow: list[float | None] = []
            lrow: list[float | None] = []
            wrow: list[str | None] = []
            for name in self.backends:
                each[name].append([None] * len(g.decode_context))
            for ci, ctx in enumerate(g.decode_context):
                if b * ctx > cap or self.out_of_time():
                    arow.append(None)
                    lrow.append(None)
                    wrow.append(None)
                    continue
                kcs = [kb[: b * ctx * per_tok].view(b, s.kv_heads, ctx, s.head_dim) for kb in kbufs]
                vcs = [vb[: b * ctx * per_tok].view(b, s.kv_heads, ctx, s.head_dim) for vb in vbufs]
                x, cos, sin = self._inputs(b, pos=ctx)
                q0 = torch.randn(b, s.q_heads, s.head_dim, device=self.device, dtype=torch.bfloat16)
                k0 = torch.randn(b, s.kv_heads, s.head_dim, device=self.device, dtype=torch.bfloat16)
                best: tuple[float, str] | None = None
                for backend in self.backends:

                    def attn_only(
                        backend: str = backend,
                        kcs: list[torch.Tensor] = kcs,
                        vcs: list[torch.Tensor] = vcs,
                        q0: torch.Tensor = q0,
                        k0: torch.Tensor = k0,
                        ctx: int = ctx,
                    ) -> None:
                        for kc, vc in zip(kcs, vcs, strict=True):
                            kc[:, :, ctx - 1] = k0  # reshape_and_cache: write this token's K, V
                            vc[:, :, ctx - 1] = k0
                            decode_attention(backend, q0, kc, vc)

                    try:
                        ms = self.timer.time_ms(attn_only) / n
                    except RuntimeError as exc:
                        self.notes.append(f"{backend} decode failed at B={b} ctx={ctx}: {exc}"[:200])
                        continue
                    each[backend][-1][ci] = round(ms, 5)
                    if best is None or ms < best[0]:
                        best = (ms, backend)
                if best is None:
                    arow.append(None)
                    lrow.append(None)
                    wrow.append(None)
                    continue
                backend = best[1]

                def whole(
                    backend: str = backend,
                    kcs: list[torch.Tensor] = kcs,
                    vcs: list[torch.Tensor] = vcs,
                    x: torch.Tensor = x,
                    cos: torch.Tensor = cos,
                    sin: torch.Tensor = sin,
                    ctx: int = ctx,
                    b: int = b,
                ) -> None:
                    h, r = x, torch.zeros_like(x)
                    for layer, kc, vc in zip(self.layers, kcs, vcs, strict=True):
                        q, k, v, r = layer.pre_attn(h, r, cos, sin)
                        kc[:, :, ctx - 1] = k
                        vc[:, :, ctx - 1] = v
                        h, r = layer.post_attn(decode_attention(backend, q, kc, vc), r)

                lms = self.timer.time_ms(whole) / n if whole_layer else float("nan")
                arow.append(round(best[0], 5))
                lrow.append(round(lms, 5) if whole_layer else None)
                wrow.append(backend)
                times = ", ".join(f"{k} {v[-1][ci]:.4f}" for k, v in each.items() if v[-1][ci] is not None)
                self.log(f"decode B={b:3d} ctx={ctx:6d}: attention {times} ms; layer {lms:.4f} ms")
            attn_ms.append(arow)
            layer_ms.append(lrow)
            winner.append(wrow)
        del kbufs, vbufs
        grid = {"batch": g.decode_batch, "context": g.decode_context}
        return (
            {**grid, "ms": attn_ms},
            {**grid, "ms": layer_ms},
            {**grid, "backend": winner},
            {**grid, "ms_by_backend": each},
        )

    def prefill(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(best ms, winning backend, ms of every backend) per (chunk, context) cell."""
        s, g = self.s, self.g
        ms_rows: list[list[float | None]] = []
        winner: list[list[str | None]] = []
        each: dict[str, list[list[float | None]]] = {b: [] for b in self.backends}
        for chunk in g.prefill_chunk:
            row: list[float | None] = []
            wrow: list[str | None] = []
            for b in self.backends:
                each[b].append([])
            for ctx in g.prefill_context:
                cell_ms: dict[str, float] = {}
                if self.out_of_time():
                    row.append(None)
                    wrow.append(None)
                    for b in self.backends:
                        each[b][-1].append(None)
                    continue
                total = ctx + chunk
                q = torch.randn(1, s.q_heads, chunk, s.head_dim, device=self.device, dtype=torch.bfloat16)
                # The cache's KV heads where the kernel takes GQA, else K/V expanded to the
                # query heads (same FLOPs, more bytes read).
                kg = torch.randn(1, s.kv_heads, total, s.head_dim, device=self.device, dtype=torch.bfloat16)
                vg = torch.randn_like(kg)
                rep = s.q_heads // s.kv_heads
                kx, vx = kg.repeat_interleave(rep, dim=1), vg.repeat_interleave(rep, dim=1)
                best: tuple[float, str] | None = None
                for backend in self.backends:
                    k, v = (kg, vg) if backend in self.gqa_native else (kx, vx)

                    def attn(
                        backend: str = backend, q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v
                    ) -> None:
                        prefill_attention(backend, q, k, v)

                    try:
                        ms = self.timer.time_ms(attn, reps=max(3, self.g.reps // 3))
                    except RuntimeError as exc:
                        self.notes.append(f"{backend} prefill failed at chunk={chunk} ctx={ctx}: {exc}"[:200])
                        continue
                    cell_ms[backend] = ms
                    if best is None or ms < best[0]:
                        best = (ms, backend)
                del q, k, v, kg, vg, kx, vx
                row.append(None if best is None else round(best[0], 5))
                wrow.append(None if best is None else best[1])
                for b in self.backends:
                    each[b][-1].append(round(cell_ms[b], 5) if b in cell_ms else None)
                if best:
                    flops = 4 * s.q_heads * s.head_dim * chunk * (ctx + chunk / 2)
                    rates = ", ".join(f"{b} {flops / t / 1e9:.0f}" for b, t in cell_ms.items())
                    self.log(f"prefill chunk={chunk:5d} ctx={ctx:6d}: {best[0]:.4f} ms ({best[1]}); TFLOP/s {rates}")
            ms_rows.append(row)
            winner.append(wrow)
        grid = {"chunk": g.prefill_chunk, "context": g.prefill_context}
        return {**grid, "ms": ms_rows}, {**grid, "backend": winner}, {**grid, "ms_by_backend": each}

    def lm_head(self) -> dict[str, list[Any]]:
        out_t: list[int] = []
        out_ms: list[float] = []
        for t in self.g.lm_tokens:
            x = torch.randn(t, self.s.hidden, device=self.device, dtype=torch.bfloat16)

            def head(x: torch.Tensor = x) -> None:
                F.linear(rms_norm(x, self.norm_f), self.lm_w)

            ms = self.timer.time_ms(head)
            out_t.append(t)
            out_ms.append(round(ms, 5))
            self.log(f"lm_head S={t}: {ms:.4f} ms")
        return {"tokens": out_t, "ms": out_ms}

    # -- the report --------------------------------------------------------------------

    def floors(self, layer: dict[str, Any], lm: dict[str, list[Any]], bw_gbps: float) -> list[dict[str, Any]]:
        """Measured decode step against the HBM floor: each GPU must read its weights and
        the KV of every sequence once per step."""
        s = self.s
        wbytes_layer = s.layer_weight_params() * (1 if self.fp8 else 2)
        lm_bytes = s.vocab * s.hidden * 2
        rows = []
        for i, b in enumerate(layer["batch"]):
            for j, ctx in enumerate(layer["context"]):
                ms = layer["ms"][i][j]
                if ms is None:
                    continue
                kv = b * ctx * s.kv_bytes_per_token_layer()
                floor_layer = (wbytes_layer + kv) / (bw_gbps * 1e6)
                lm_ms = float(_interp(lm["tokens"], lm["ms"], b))
                step = s.layers_total * ms + lm_ms
                floor_step = (s.layers_total * (wbytes_layer + kv) + lm_bytes) / (bw_gbps * 1e6)
                rows.append(
                    {
                        "batch": b,
                        "context": ctx,
                        "layer_ms": ms,
                        "layer_floor_ms": round(floor_layer, 5),
                        "step_ms_no_allreduce": round(step, 3),
                        "step_floor_ms": round(floor_step, 3),
                        "floor_fraction": round(floor_step / step, 3),
                    }
                )
        return rows

    def run(self) -> dict[str, Any]:
        started = _dt.datetime.now(_dt.UTC)
        ceil = self.ceilings()
        self.log(f"ceilings: {ceil}")
        dense = self.dense()
        attn, layer, decode_backend, decode_each = self.decode()
        prefill, prefill_backend, prefill_each = self.prefill()
        lm = self.lm_head()
        spec = {"h100": 3350.0, "h200": 4800.0}.get(self.gpu_key())
        # Decode streams weights and KV in: the read-only rate is its ceiling.
        bw = ceil["hbm_read_gbps"] or ceil["hbm_copy_gbps"] or 100.0
        fixed = attn["ms"][0][0]
        return {
            "kind": "mistral-large-2 layer profile",
            "gpu_name": torch.cuda.get_device_name(0) if self.device.type == "cuda" else platform.processor() or "cpu",
            "gpu_key": self.gpu_key(),
            "date": started.isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None,
            "host": platform.node(),
            "smoke": self.smoke,
            "shapes": asdict(self.s),
            "settings": {
                "tp": self.s.tp,
                "weights": "fp8 (torch._scaled_mm, per-tensor scales, static activation quant)"
                if self.fp8
                else "bfloat16",
                "weight_dtype": "fp8" if self.fp8 else "bfloat16",
                "kv_dtype": "bfloat16",
                "elementwise": self.compile_mode,
                "cuda_graphs": self.timer.use_graphs,
                "layers_in_graph": self.g.layers_in_graph,
                "reps_median_of": self.g.reps,
                "attention": f"torch SDPA backends tried {self.backends}; faster per cell kept",
                "gqa_native_prefill": sorted(self.gqa_native),
                "decode_max_kv_tokens": self.g.decode_max_kv_tokens,
                "allreduce": "excluded (see allreduce_*.json)",
            },
            "ceilings": {**ceil, "hbm_spec_gbps": spec},
            "dense_ms": dense,
            "decode_attn_ms": attn,
            "decode_layer_ms": layer,
            "decode_backend": decode_backend,
            "prefill_attn_ms": prefill,
            "prefill_backend": prefill_backend,
            "decode_attn_by_backend": decode_each,
            "prefill_attn_by_backend": prefill_each,
            "lm_head_ms": lm,
            "attn_fixed_ms": fixed,
            "decode_vs_hbm_floor": {
                "bandwidth_gbps_used": bw,
                "rows": self.floors(layer, lm, bw),
                "rows_at_spec_bandwidth": self.floors(layer, lm, spec) if spec else [],
            },
            "notes": self.notes + [f"graph capture failed, timed eagerly: {m}" for m in self.timer.graph_failures[:5]],
            "wall_s": round((_dt.datetime.now(_dt.UTC) - started).total_seconds(), 1),
        }

    def attention_into(self, table: dict[str, Any]) -> dict[str, Any]:
        """Re-measure decode and prefill attention into an existing table (same GPU kind,
        TP and grid), keeping its dense, LM-head and whole-layer figures and the replaced
        attention under `previous_attention`, so old and new kernels stay comparable."""
        started = _dt.datetime.now(_dt.UTC)
        attn, _, decode_backend, decode_each = self.decode(whole_layer=False)
        prefill, prefill_backend, prefill_each = self.prefill()
        out = dict(table)
        out["previous_attention"] = {
            "date": table.get("date"),
            "attention": table.get("settings", {}).get("attention"),
            "decode_attn_ms": table["decode_attn_ms"],
            "prefill_attn_ms": table["prefill_attn_ms"],
            "attn_fixed_ms": table["attn_fixed_ms"],
        }
        out.update(
            decode_attn_ms=attn,
            decode_backend=decode_backend,
            prefill_attn_ms=prefill,
            prefill_backend=prefill_backend,
            decode_attn_by_backend=decode_each,
            prefill_attn_by_backend=prefill_each,
            attn_fixed_ms=attn["ms"][0][0],
            attention_date=started.isoformat(timespec="seconds"),
            attention_gpu_name=torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
            attention_software={
                "torch": torch.__version__,
                "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None,
            },
        )
        out["settings"] = {
            **table.get("settings", {}),
            "attention": f"torch SDPA backends tried {self.backends}; faster per cell kept",
            "gqa_native_prefill": sorted(self.gqa_native),
        }
        out["notes"] = list(table.get("notes", [])) + self.notes
        return out

    def gpu_key(self) -> str:
        if self.device.type != "cuda":
            return "cpu"
        name = torch.cuda.get_device_name(0).lower()
        return "h200" if "h200" in name else ("h100" if "h100" in name else name.replace(" ", "-"))


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1] * x / xs[-1]


def transfer_attention(target: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """Carry a re-measurement (`source`, made by --attention-into on another GPU of the
    same TP) over to `target`: where the source's fastest kernel changed, target's cell is
    scaled by the source's new / previous time of that cell. Both GPUs ran the previous
    kernels on the same shapes, so the ratio is the new kernel's gain, and target's own
    GPU difference (HBM bandwidth for decode) stays in its cells; where the same kernel
    still wins on the same data layout, target keeps its own measurement rather than
    taking the source's noise (prefill's layout changed where the source read K/V in GQA
    form and target expanded it). Used for the H100 tables while only H200 measurements exist."""
    prev = source["previous_attention"]
    if source["settings"]["tp"] != target["settings"]["tp"]:
        raise ValueError("attention transfer needs tables of the same TP (same per-GPU heads)")
    out = dict(target)
    out["previous_attention"] = {
        "date": target.get("date"),
        "attention": target.get("settings", {}).get("attention"),
        "decode_attn_ms": target["decode_attn_ms"],
        "prefill_attn_ms": target["prefill_attn_ms"],
        "attn_fixed_ms": target["attn_fixed_ms"],
    }
    for key, backend_key in (("decode_attn_ms", "decode_backend"), ("prefill_attn_ms", "prefill_backend")):
        new, old, mine = source[key]["ms"], prev[key]["ms"], target[key]["ms"]
        if len(new) != len(mine) or any(len(a) != len(b) for a, b in zip(new, mine, strict=True)):
            raise ValueError(f"{key}: grids differ")
        won_new, won_before = source[backend_key]["backend"], target[backend_key]["backend"]
        gqa_src = set(source["settings"].get("gqa_native_prefill", []))
        relaid = key == "prefill_attn_ms" and gqa_src != set(target["settings"].get("gqa_native_prefill", []))
        scaled = [
            [
                m if m is None or n is None or o is None or (wn == wb and not relaid) else round(m * n / o, 5)
                for m, n, o, wn, wb in zip(mr, nr, orow, wnr, wbr, strict=True)
            ]
            for mr, nr, orow, wnr, wbr in zip(mine, new, old, won_new, won_before, strict=True)
        ]
        out[key] = {**target[key], "ms": scaled}
        out[backend_key] = source[backend_key]
    out["attn_fixed_ms"] = out["decode_attn_ms"]["ms"][0][0]
    out["attention_transferred_from"] = {
        "gpu_name": source.get("attention_gpu_name"),
        "date": source.get("attention_date"),
        "software": source.get("attention_software"),
        "how": "cell x (source new / source previous), see transfer_attention",
    }
    out["settings"] = {
        **target.get("settings", {}),
        "attention": source["settings"]["attention"],
        "gqa_native_prefill": source["settings"].get("gqa_native_prefill", []),
    }
    return out


def print_summary(table: dict[str, Any]) -> None:
    print(
        f"\n{table['gpu_name']} TP={table['settings']['tp']} {table['settings']['weight_dtype']} "
        f"({table['settings']['elementwise']}); ceilings {table['ceilings']}"
    )
    print(f"{'batch':>6} {'ctx':>7} {'layer ms':>9} {'floor':>8} {'step ms':>8} {'floor':>8} {'frac':>5}")
    for r in table["decode_vs_hbm_floor"]["rows"]:
        print(
            f"{r['batch']:>6} {r['context']:>7} {r['layer_ms']:>9.4f} {r['layer_floor_ms']:>8.4f} "
            f"{r['step_ms_no_allreduce']:>8.2f} {r['step_floor_ms']:>8.2f} {r['floor_fraction']:>5.2f}"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size whose per-GPU shapes to time")
    parser.add_argument("--weights", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script only")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop adding grid points after this long")
    parser.add_argument("--no-graphs", action="store_true", help="time eagerly instead of replaying CUDA graphs")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fuse elementwise work with torch.compile (GPU only)",
    )
    parser.add_argument(
        "--transfer-attention",
        nargs=2,
        type=Path,
        metavar=("SOURCE", "TARGET"),
        default=None,
        help="no GPU: rewrite TARGET's attention cells by SOURCE's re-measurement (transfer_attention)",
    )
    parser.add_argument(
        "--attention-into",
        type=Path,
        default=None,
        help="re-measure only the attention tables of this layer table (its TP and weights), write it to --out",
    )


def run(args: argparse.Namespace) -> int:
    if args.transfer_attention:
        src, dst = args.transfer_attention
        table = transfer_attention(json.loads(dst.read_text()), json.loads(src.read_text()))
        dst.write_text(json.dumps(table, indent=1) + "\n")
        print(f"rewrote {dst} from {src}")
        return 0
    if args.attention_into:
        existing = json.loads(args.attention_into.read_text())
        args.tp = existing["settings"]["tp"]
        args.weights = "fp8" if existing["settings"]["weight_dtype"] == "fp8" else "bf16"
        args.compile = False  # attention has no elementwise work to fuse
        prof = Profiler(args)
        table = prof.attention_into(existing)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / args.attention_into.name
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    prof = Profiler(args)
    table = prof.run()
    args.out.mkdir(parents=True, exist_ok=True)
    wname = "fp8" if prof.fp8 else "bf16"
    name = f"layers_{table['gpu_key']}_tp{table['settings']['tp']}_{wname}.json"
    path = args.out / name
    path.write_text(json.dumps(table, indent=1) + "\n")
    print_summary(table)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
