"""A Llama-3.1-8B-shaped model folder with no weights (``load_format="dummy"``).

No checkpoint can travel to the GPU machine, and none is needed for speed
and exactness checks: vLLM builds the real shapes and fills the weights with
random numbers (the same in every engine: vLLM seeds them). Token-id prompts
and ``skip_tokenizer_init=True`` make a tokenizer unnecessary too.
"""

from __future__ import annotations

import json
from pathlib import Path

# meta-llama/Llama-3.1-8B's config.json, the fields vLLM reads.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
}


def kv_bytes_per_token(config: dict = LLAMA_3_1_8B, dtype_bytes: int = 2) -> int:
    """K and V of one token over all layers (128 KiB for the 8B in bf16)."""
    return (2 * config["num_hidden_layers"] * config["num_key_value_heads"]
            * config["head_dim"] * dtype_bytes)


def write_model(folder: Path, config: dict = LLAMA_3_1_8B) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder
