"""The tensor-parallel all-reduce vLLM 0.29 runs on Hopper, per message size and TP size,
and what it costs: the simulator's default all-reduce model.

vLLM's CudaCommunicator.all_reduce tries, in order (device_communicators/
cuda_communicator.py, all_reduce_utils.py, custom_all_reduce.py, symm_mem.py, and
csrc/custom_all_reduce.cuh), with its defaults on an NVSwitch (full NVLink) sm90 node:

1. the custom all-reduce (P2P over NVLink through CUDA IPC buffers) for messages below
   CUSTOM_AR_MAX_BYTES[tp] (sm90, symmetric memory available): one-shot (every GPU
   reads all peers' buffers and sums) at TP=2, and below 512 KB at TP<=4 / 256 KB at
   TP=8; two-shot (reduce-scatter then all-gather over P2P) above that;
2. PyTorch symmetric memory below SYMM_MEM_MAX_BYTES[tp]: `multimem_all_reduce_` (NVLink
   SHARP in the switch) at TP 4/6/8, with a copy into and out of the symmetric buffer;
   at TP=4 the custom all-reduce's limit equals this one, so it never gets here;
3. NCCL (pynccl) beyond.

At the default optimisation level (-O2) the compile pass `fuse_allreduce_rms` replaces
all-reduce + residual add + RMSNorm by FlashInfer's fused kernel where FlashInfer is
installed (a vLLM dependency) on sm90, for messages up to FI_FUSION_MAX_BYTES[tp]; every
all-reduce of a Mistral layer is followed by such a norm, so those calls also save the
fixed cost of the separate add + RMSNorm kernel, which the dense layer table includes.

Not modelled: NCCL symmetric-memory all-reduce (VLLM_USE_NCCL_SYMM_MEM, off by default);
sequence parallelism + async TP (-O2 enables them for dense models, but only above
8 MiB x TP of hidden state, 2,730 tokens at TP=8, and only with full-graph compilation,
which the default piecewise graphs are not).

Constants: the NCCL curve and the local parts (add + RMSNorm, the symm-mem copies, the
kernel floor) are measured (bench/calibration/allreduce_*.json); the P2P and multimem
latencies and bandwidths cannot be measured on the one- and two-GPU machines measured so far
and are modelled (NvlinkConstants), flagged as such in every table and description.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB

# all_reduce_utils.py, sm90 ("9.0").
CUSTOM_AR_MAX_BYTES = {2: 64 * MiB, 4: 32 * MiB, 6: MiB // 2, 8: MiB // 4}
SYMM_MEM_MAX_BYTES = {2: 64 * MiB, 4: 32 * MiB, 6: 64 * MiB, 8: 64 * MiB}
# symm_mem.py: world sizes that use multimem (NVLS) on sm90; others use two-shot.
SYMM_MEM_MULTIMEM_TP = (4, 6, 8)
# custom_all_reduce.cuh: one-shot below these sizes on a full-NVLink node (TP=2: always).
ONE_SHOT_BELOW = {4: 512 * KiB, 8: 256 * KiB}
# compilation/passes/fusion/allreduce_rms_fusion.py: FI_ALLREDUCE_FUSION_MAX_SIZE_MB[90].
FI_FUSION_MAX_BYTES = {2: 64 * MiB, 4: 2 * MiB, 8: 1 * MiB}

ALGORITHMS = ("custom-1shot", "custom-2shot", "symm-mem-multimem", "symm-mem-2shot", "nccl")


@dataclass(frozen=True)
class NvlinkConstants:
    """Modelled costs of the P2P / NVLS kernels on an 8-GPU NVSwitch H100/H200 node: a
    fixed cost (launch, the cross-GPU barrier flags) plus bytes over the NVLink rate.
    Chosen from the hardware (NVLink 4: 450 GB/s per direction per GPU; P2P kernels reach
    about 80%) and vLLM's own reports (custom all-reduce a few microseconds, ahead of
    NCCL's ~12 us measured at TP=2 here); not measured here."""

    one_shot_us: float = 5.0  # barrier + one pass reading the peers
    two_shot_us: float = 8.0  # two passes, two barriers
    multimem_us: float = 8.0  # NVLS ld_reduce + multimem store, two barriers
    p2p_gbps: float = 360.0  # NVLink bytes per GPU per second the P2P kernels reach
    nvls_bus_gbps: float = 400.0  # NVLS "bus bandwidth" (nccl-tests' convention)


@dataclass(frozen=True)
class LocalParts:
    """One-GPU measurements (profile_allreduce.py --local), by message size."""

    bytes: Sequence[float]
    add_rmsnorm_us: Sequence[float]
    copy_in_out_us: Sequence[float]
    kernel_floor_us: float

    def _at(self, ys: Sequence[float], nbytes: float) -> float:
        xs = self.bytes
        if nbytes <= xs[0]:
            return ys[0]
        if nbytes >= xs[-1]:
            return ys[-1] * nbytes / xs[-1]  # bandwidth-bound past the end
        lx = math.log(nbytes)
        for i in range(1, len(xs)):
            if nbytes <= xs[i]:
                x0, x1 = math.log(xs[i - 1]), math.log(xs[i])
                return ys[i - 1] + (ys[i] - ys[i - 1]) * (lx - x0) / (x1 - x0)
        return ys[-1]

    def add_rmsnorm(self, nbytes: float) -> float:
        return self._at(self.add_rmsnorm_us, nbytes)

    def copy_in_out(self, nbytes: float) -> float:
        return self._at(self.copy_in_out_us, nbytes)


@dataclass(frozen=True)
class NcclCurve:
    """NCCL beyond the other paths: its measured latency plus the ring's bandwidth term
    at the bus bandwidth measured (NVLS off, as measured)."""

    latency_us: float
    bus_gbps: float

    def time_us(self, tp: int, nbytes: float) -> float:
        return self.latency_us + 2 * (tp - 1) / tp * nbytes / (self.bus_gbps * 1e3)


def algorithm(tp: int, nbytes: float) -> str:
    """The path vLLM 0.29's CudaCommunicator takes for this message on sm90."""
    if nbytes < CUSTOM_AR_MAX_BYTES.get(tp, 0):
        if tp == 2 or nbytes < ONE_SHOT_BELOW.get(tp, 0):
            return "custom-1shot"
        return "custom-2shot"
    if nbytes < SYMM_MEM_MAX_BYTES.get(tp, 0):
        return "symm-mem-multimem" if tp in SYMM_MEM_MULTIMEM_TP else "symm-mem-2shot"
    return "nccl"


def fuses_rmsnorm(tp: int, nbytes: float) -> bool:
    """FlashInfer's all-reduce + RMSNorm fusion covers this call (-O2 default on sm90)."""
    return nbytes <= FI_FUSION_MAX_BYTES.get(tp, 0)


@dataclass(frozen=True)
class VllmAllReduce:
    """Time of one TP all-reduce as vLLM runs it, net of the add + RMSNorm it fuses."""

    tp: int
    nccl: NcclCurve
    local: LocalParts | None = None
    nvlink: NvlinkConstants = NvlinkConstants()
    fuse_rmsnorm: bool = True

    def raw_us(self, nbytes: float) -> float:
        """The all-reduce kernel(s) alone."""
        n, c = self.tp, self.nvlink
        algo = algorithm(n, nbytes)
        if algo == "custom-1shot":
            return c.one_shot_us + (n - 1) * nbytes / (c.p2p_gbps * 1e3)
        if algo == "custom-2shot":
            return c.two_shot_us + 2 * (n - 1) / n * nbytes / (c.p2p_gbps * 1e3)
        if algo.startswith("symm-mem"):
            copies = self.local.copy_in_out(nbytes) if self.local else 2 * 2 * nbytes / 3.0e6
            bus = c.nvls_bus_gbps if algo == "symm-mem-multimem" else c.p2p_gbps
            return c.multimem_us + copies + 2 * (n - 1) / n * nbytes / (bus * 1e3)
        return self.nccl.time_us(n, nbytes)

    def fused_saving_us(self, nbytes: float) -> float:
        """What the fused kernel saves: the separate add + RMSNorm kernel's fixed cost (its
        smallest measured time, less one kernel floor for the fused kernel's extra work).
        Its bytes are not saved: the fused kernel reads and writes them itself."""
        if not (self.fuse_rmsnorm and self.local and fuses_rmsnorm(self.tp, nbytes)):
            return 0.0
        return max(0.0, self.local.add_rmsnorm_us[0] - self.local.kernel_floor_us)

    def time_us(self, nbytes: float) -> float:
        if self.tp <= 1 or nbytes <= 0:
            return 0.0
        return self.raw_us(nbytes) - self.fused_saving_us(nbytes)
