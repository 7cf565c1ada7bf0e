"""Memory arithmetic of one engine replica: weights, KV cache, concurrency.

vLLM reserves `gpu_memory_utilization` of each GPU, loads 1/TP of the weights on each,
keeps a per-GPU reserve for activations, CUDA graphs and NCCL buffers, and gives the
rest to the paged KV cache. With TP <= num_kv_heads each GPU holds num_kv_heads/TP of
the KV heads; beyond that heads are replicated, so one GPU always holds at least one.
On CPU the KV cache is a fixed size (VLLM_CPU_KVCACHE_SPACE) and weights sit in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.architecture import ModelArchitecture

GiB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    """Per-replica memory figures for one pool; all sizes in bytes."""

    pool: str
    accelerator: str
    tensor_parallel_size: int
    device_bytes: int  # usable memory per device: GPU memory x utilization (CPU: KV space)
    weight_bytes_total: int
    weight_bytes_per_device: int
    reserve_bytes_per_device: int
    kv_bytes_per_token: int  # whole replica, all layers, K and V
    kv_bytes_per_token_per_device: int
    kv_bytes_per_replica: int
    kv_tokens_per_replica: int
    block_size: int
    kv_blocks_per_replica: int
    max_model_len: int
    max_concurrent_full_sequences: int  # sequences of max_model_len that fit at once

    def fits(self) -> bool:
        return self.max_concurrent_full_sequences >= 1

    def explain(self) -> str:
        """The arithmetic as a sentence an operator can check by hand."""
        gib = lambda b: b / GiB  # noqa: E731
        if self.accelerator == "cpu":
            return (
                f"pool {self.pool!r}: KV space {gib(self.kv_bytes_per_replica):.2f} GiB / "
                f"{self.kv_bytes_per_token:,} B per token = {self.kv_tokens_per_replica:,} tokens; "
                f"one {self.max_model_len:,}-token sequence needs "
                f"{self.max_model_len * self.kv_bytes_per_token / GiB:.2f} GiB"
            )
        tp = self.tensor_parallel_size
        return (
            f"pool {self.pool!r}: TP={tp} x {gib(self.device_bytes):.1f} GiB usable = "
            f"{gib(tp * self.device_bytes):.1f} GiB; weights {gib(self.weight_bytes_total):.1f} GiB "
            f"+ reserve {tp} x {gib(self.reserve_bytes_per_device):.1f} GiB leaves "
            f"{gib(self.kv_bytes_per_replica):.1f} GiB for KV = {self.kv_tokens_per_replica:,} tokens "
            f"at {self.kv_bytes_per_token:,} B/token; one {self.max_model_len:,}-token sequence "
            f"needs {self.max_model_len * self.kv_bytes_per_token / GiB:.1f} GiB of KV"
        )


def plan_replica(
    *,
    pool: str,
    arch: ModelArchitecture,
    weight_dtype: str,
    kv_dtype: str,
    accelerator: str,
    tensor_parallel_size: int,
    gpu_memory_gib: float,
    gpu_memory_utilization: float,
    reserve_gib_per_device: float,
    cpu_kv_cache_space_gib: float,
    block_size: int,
    max_model_len: int,
) -> MemoryPlan:
    tp = tensor_parallel_size
    weights = arch.weight_bytes(weight_dtype)
    kv_per_token = arch.kv_bytes_per_token(kv_dtype)
    kv_heads_per_device = max(1, arch.num_kv_heads // tp)
    kv_per_token_per_device = kv_per_token * kv_heads_per_device // arch.num_kv_heads
    if accelerator == "cpu":
        device_bytes = int(cpu_kv_cache_space_gib * GiB)
        reserve = 0
        kv_bytes = device_bytes
        kv_tokens = kv_bytes // kv_per_token
    else:
        device_bytes = int(gpu_memory_gib * GiB * gpu_memory_utilization)
        reserve = int(reserve_gib_per_device * GiB)
        weights_per_device = -(-weights // tp)
        free_per_device = max(0, device_bytes - weights_per_device - reserve)
        kv_tokens = free_per_device // kv_per_token_per_device
        kv_bytes = kv_tokens * kv_per_token
    blocks = kv_tokens // block_size
    return MemoryPlan(
        pool=pool,
        accelerator=accelerator,
        tensor_parallel_size=tp,
        device_bytes=device_bytes,
        weight_bytes_total=weights,
        weight_bytes_per_device=-(-weights // tp),
        reserve_bytes_per_device=reserve,
        kv_bytes_per_token=kv_per_token,
        kv_bytes_per_token_per_device=kv_per_token_per_device,
        kv_bytes_per_replica=kv_bytes,
        kv_tokens_per_replica=blocks * block_size,
        block_size=block_size,
        kv_blocks_per_replica=blocks,
        max_model_len=max_model_len,
        max_concurrent_full_sequences=(blocks * block_size) // max_model_len,
    )
