"""Memory arithmetic of Mistral Large 2 against values computed by hand (shown inline)."""

from __future__ import annotations

from cluster.architecture import MISTRAL_LARGE_2, TINY_MISTRAL
from cluster.memory import GiB
from cluster.profiles import load_profile

# Per layer, by hand (hidden 12288, 96 q heads x 128, 8 KV heads x 128, MLP 28672):
#   q: 12288 x 12288 = 150,994,944     k, v: 2 x 12288 x 1024 = 25,165,824
#   o: 12288 x 12288 = 150,994,944     MLP: 3 x 12288 x 28672 = 1,056,964,608
#   layer total = 1,384,120,320;  x 88 layers = 121,802,588,160
# Embedding + LM head (untied): 2 x 32768 x 12288 = 805,306,368
# RMSNorm weights: (2 x 88 + 1) x 12288 = 2,174,976
PARAMS_PER_LAYER = 1_384_120_320
PARAMS_TOTAL = 121_802_588_160 + 805_306_368 + 2_174_976  # 122,610,069,504


def test_param_count_of_mistral_large_2() -> None:
    assert MISTRAL_LARGE_2.linear_params_per_layer() == PARAMS_PER_LAYER
    assert MISTRAL_LARGE_2.param_count() == 122_610_069_504 == PARAMS_TOTAL


def test_kv_bytes_per_token() -> None:
    # 88 layers x 8 KV heads x 128 head_dim x 2 (K and V) x 2 bytes (bf16)
    assert MISTRAL_LARGE_2.kv_bytes_per_token("bfloat16") == 360_448
    # fp8 KV: 1 byte per value
    assert MISTRAL_LARGE_2.kv_bytes_per_token("fp8") == 180_224
    # tiny: 4 layers x 1 KV head x 32 x 2 x 2 bytes
    assert TINY_MISTRAL.kv_bytes_per_token("bfloat16") == 512


def test_weight_bytes() -> None:
    assert MISTRAL_LARGE_2.weight_bytes("bfloat16") == 245_220_139_008  # 2 x params: the "246 GB"
    # fp8: linear layers 1 byte each, embeddings/head/norms stay bf16
    assert MISTRAL_LARGE_2.weight_bytes("fp8") == 121_802_588_160 + 2 * (805_306_368 + 2_174_976)


def test_h100x8_bf16_plan_by_hand() -> None:
    cfg = load_profile("h100x8-bf16")
    plan = cfg.memory_plan(cfg.pool("long"))
    # weights per GPU: 245,220,139,008 / 8 = 30,652,517,376 B (28.5 GiB)
    assert plan.weight_bytes_per_device == 30_652_517_376
    # usable per GPU: 80 GiB x 0.90 = 77,309,411,328 B; minus weights and the 4 GiB reserve
    # (4,294,967,296) = 42,361,926,656 B free per GPU for KV
    assert plan.device_bytes == 77_309_411_328
    # each GPU holds 1 of the 8 KV heads: 360,448 / 8 = 45,056 B per token per GPU
    assert plan.kv_bytes_per_token_per_device == 45_056
    # 42,361,926,656 // 45,056 = 940,206 tokens -> 58,762 blocks of 16 = 940,192 tokens
    assert plan.kv_blocks_per_replica == 58_762
    assert plan.kv_tokens_per_replica == 940_192
    # 940,192 // 131,072 = 7 concurrent 128k sequences per replica
    assert plan.max_concurrent_full_sequences == 7
    assert plan.fits()


def test_h100x4_fp8_plan_by_hand() -> None:
    cfg = load_profile("h100x4-fp8")
    plan = cfg.memory_plan(cfg.pool("long"))
    # fp8 weights 123,417,550,848 B / 4 = 30,854,387,712 B per GPU
    assert plan.weight_bytes_per_device == 30_854_387_712
    # 2 KV heads per GPU at 1 byte: 180,224 / 4 = 45,056 B per token per GPU
    assert plan.kv_bytes_per_token_per_device == 45_056
    # (77,309,411,328 - 30,854,387,712 - 4,294,967,296) // 45,056 = 935,725 -> 58,482 blocks
    assert plan.kv_blocks_per_replica == 58_482
    assert plan.max_concurrent_full_sequences == 935_712 // 131_072 == 7


def test_cpu_plan_uses_the_fixed_kv_space() -> None:
    cfg = load_profile("cpu-tiny")
    plan = cfg.memory_plan(cfg.pool("standard"))
    assert plan.kv_bytes_per_replica == 1 * GiB
    assert plan.kv_tokens_per_replica == GiB // 512  # 2,097,152 tokens
    assert plan.max_concurrent_full_sequences == 2_097_152 // 2048
