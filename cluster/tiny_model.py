"""The embedded default model: Mistral Large 2's architecture at tiny width, random weights.

Generated once at run time (never committed) into a cache directory outside git:
`$CLUSTER_CACHE_DIR` or `~/.cache/mistral-large-serve`. The folder holds what vLLM's
`tokenizer_mode="mistral"` + `config_format="hf"` + `load_format="safetensors"` read:
`config.json` (MistralForCausalLM), `model.safetensors` and the real Mistral v7
tokenizer shipped by mistral-common, as `tokenizer.model.v7` (mistral-common picks
SentencePiece files by their `.model.v<N>` suffix).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cluster.architecture import TINY_MISTRAL, ModelArchitecture

EMBEDDED_PREFIX = "embedded:"
V7_TOKENIZER_FILE = "mistral_instruct_tokenizer_241114.model.v7"
SEED = 20241114


def cache_root() -> Path:
    return Path(os.environ.get("CLUSTER_CACHE_DIR") or Path.home() / ".cache" / "mistral-large-serve")


def bundled_v7_tokenizer() -> Path:
    """Mistral-Large-Instruct-2411's tokenizer (SentencePiece, v7), shipped in mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / V7_TOKENIZER_FILE


def _fingerprint(arch: ModelArchitecture) -> str:
    # A changed architecture or seed gets a new folder instead of stale weights.
    blob = json.dumps({"arch": arch.model_dump(mode="json"), "seed": SEED}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_dir(arch: ModelArchitecture = TINY_MISTRAL) -> Path:
    return cache_root() / f"tiny-mistral-{_fingerprint(arch)}"


def hf_config(arch: ModelArchitecture) -> dict[str, object]:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "sliding_window": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def _generate(arch: ModelArchitecture, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    fields: dict[str, Any] = {k: v for k, v in hf_config(arch).items() if k not in ("architectures", "model_type")}
    config = MistralConfig(**fields)
    torch.manual_seed(SEED)
    model = MistralForCausalLM(config).to(dtype=torch.bfloat16)  # type: ignore[arg-type,call-arg]
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf_config(arch), indent=2))
    shutil.copyfile(bundled_v7_tokenizer(), dest / "tokenizer.model.v7")


def ensure_tiny_model(arch: ModelArchitecture = TINY_MISTRAL, *, quiet: bool = False) -> Path:
    """Return the model folder, generating it first if missing. Safe to call from many
    processes at once: a file lock serialises generation and the folder appears atomically."""
    dest = model_dir(arch)
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "config.json").exists():
            return dest
        if not quiet:
            print(f"generating the embedded tiny model into {dest} (once) ...", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
        try:
            _generate(arch, tmp)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model_source(source: str, arch: ModelArchitecture) -> str:
    """Map `embedded:tiny` to its generated folder; pass real paths/URIs through."""
    if source.startswith(EMBEDDED_PREFIX):
        name = source[len(EMBEDDED_PREFIX) :]
        if name != "tiny":
            raise ValueError(f"unknown embedded model {source!r}; only 'embedded:tiny' exists")
        return str(ensure_tiny_model(arch))
    return source
