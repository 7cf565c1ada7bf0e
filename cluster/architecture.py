"""Transformer shapes the memory arithmetic, the tiny-model generator and the simulator share."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}


class ModelArchitecture(BaseModel):
    """Shape of a Mistral-style dense decoder (MistralForCausalLM)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    def linear_params_per_layer(self) -> int:
        """Attention (q, k, v, o) and SwiGLU MLP (gate, up, down) weights of one layer."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attention + mlp

    def linear_params(self) -> int:
        return self.num_layers * self.linear_params_per_layer()

    def embedding_params(self) -> int:
        """Token embedding plus LM head (untied in Mistral Large 2)."""
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size

    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def param_count(self) -> int:
        return self.linear_params() + self.embedding_params() + self.norm_params()

    def weight_bytes(self, weight_dtype: str) -> int:
        """Bytes of all weights. FP8 quantizes the linear layers only; embeddings, LM head
        and norms stay in bf16, as vLLM's fp8 checkpoints keep them."""
        if weight_dtype == "fp8":
            return self.linear_params() + 2 * (self.embedding_params() + self.norm_params())
        return DTYPE_BYTES[weight_dtype] * self.param_count()

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """K and V of every layer for one token: layers x KV heads x head_dim x 2 x bytes."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * DTYPE_BYTES[kv_dtype]


# Mistral-Large-Instruct-2411 (params.json of the release): 88 layers, dim 12288,
# 96 heads, 8 KV heads, head_dim 128, hidden_dim 28672, vocab 32768, rope_theta 1e6.
MISTRAL_LARGE_2 = ModelArchitecture(
    num_layers=88,
    hidden_size=12288,
    num_attention_heads=96,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=28672,
    vocab_size=32768,
    rope_theta=1_000_000.0,
)

# The embedded default: the same head ratio (12:1 here, like 96:8 per KV group), RoPE
# theta and vocabulary, at a width a 2-core CPU serves in milliseconds per token.
TINY_MISTRAL = ModelArchitecture(
    num_layers=4,
    hidden_size=384,
    num_attention_heads=12,
    num_kv_heads=1,
    head_dim=32,
    intermediate_size=1024,
    vocab_size=32768,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
