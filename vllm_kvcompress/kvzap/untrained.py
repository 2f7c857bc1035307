"""A kvzap scorer with seeded random weights, for a model that has no
trained one.

Its predictions mean nothing, and its metadata says so; what it is for is
kvzap's cost and plumbing: the GPU harness's Llama-8B-shaped stand-in has
no weights to train on, yet its throughput with kvzap (feature gathering,
the per-layer products, the ranking) is the real one, and tests get a
scorer for any tiny model in milliseconds.

    python -m vllm_kvcompress.kvzap.untrained MODEL_DIR --out FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .features import RotarySpec
from .scorer_file import model_identity, save_scorer


def llama_rotary(hf_config) -> RotarySpec:
    """Llama-family rotary (vLLM's Llama turns neox pairs over
    ``partial_rotary_factor`` of each head)."""
    identity = model_identity(hf_config)
    factor = getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0
    return RotarySpec(int(identity["head_dim"] * factor), neox=True)


def write_untrained_scorer(model: str | Path, out: str | Path, seed: int = 0,
                           rotary: RotarySpec | None = None) -> Path:
    """Write a scorer that matches ``model``'s config (a folder or hub name)
    with N(0, 1/F) weights from ``seed`` and zero bias."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(model))
    identity = model_identity(hf_config)
    rotary = rotary or llama_rotary(hf_config)
    heads, head_dim = identity["num_key_value_heads"], identity["head_dim"]
    width = heads * (head_dim - rotary.dim // 2 + head_dim)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(identity["num_hidden_layers"], width, heads,
                          generator=gen) / width ** 0.5
    bias = torch.zeros(identity["num_hidden_layers"], heads)
    save_scorer(out, weights, bias, {
        "model": {"name": str(model), "identity": identity},
        "rotary": rotary.to_json(), "features": "all",
        "target": f"none: untrained, seeded random weights (seed {seed}), for cost "
                  "and plumbing only",
        "validation_r2": None})
    return Path(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model folder or name (its config.json is read)")
    parser.add_argument("--out", required=True, help="the scorer file to write (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_untrained_scorer(args.model, args.out, args.seed)} "
          "(untrained: random weights)")


if __name__ == "__main__":
    main()
