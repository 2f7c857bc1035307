"""The learned scorer's file: one safetensors file, its JSON metadata in
the header, and how the engine finds the one that fits its model.

Tensors: ``weights`` [L, F, H] and ``bias`` [L, H] (float32), a layer's
prediction being ``features @ weights[l] + bias[l]``. Metadata (key
``kvzap``): format version, the model it was trained on (name and the
config fields that fix its shapes), the rotary pairing of its keys, the
feature set, the target, and per-layer validation R^2.

A scorer is matched to a model by those config fields, never by path, so
the same checkpoint saved elsewhere or in another dtype finds it; the
scorers bundled in ``data/`` are found without a flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1
METADATA_KEY = "kvzap"
BUNDLED_DIR = Path(__file__).parent / "data"
SCORER_FLAG = "--kv-compress-scorer"
# The config fields that must agree: they fix every shape the scorer reads
# (and, for the rest, say it is the same family of model).
IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                   "max_position_embeddings")


class ScorerFileError(ValueError):
    """A scorer file is missing, unreadable or does not fit the model."""


def model_identity(hf_config) -> dict:
    """The fields of ``IDENTITY_FIELDS`` from a (text) model config."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    found = {name: getattr(text, name, None) for name in IDENTITY_FIELDS}
    if found["num_key_value_heads"] is None:
        found["num_key_value_heads"] = found["num_attention_heads"]
    if found["head_dim"] is None and found["hidden_size"] and found["num_attention_heads"]:
        found["head_dim"] = found["hidden_size"] // found["num_attention_heads"]
    return found


@dataclass
class LearnedScorer:
    weights: torch.Tensor  # [L, F, H] float32
    bias: torch.Tensor  # [L, H] float32
    metadata: dict
    path: str

    @property
    def rotary(self):
        from .features import RotarySpec

        return RotarySpec(**self.metadata["rotary"])


def save_scorer(path: str | Path, weights: torch.Tensor, bias: torch.Tensor,
                metadata: dict) -> None:
    from safetensors.torch import save_file

    metadata = {"format_version": FORMAT_VERSION, **metadata}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"weights": weights.float().contiguous(), "bias": bias.float().contiguous()},
              str(path), metadata={METADATA_KEY: json.dumps(metadata)})


def read_metadata(path: str | Path) -> dict:
    """The scorer's metadata, or a ``ScorerFileError`` naming the flag."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # missing file, not safetensors
        raise ScorerFileError(
            f"{SCORER_FLAG} {path}: cannot read it as a kvzap scorer file ({e}).") from None
    if raw is None:
        raise ScorerFileError(f"{SCORER_FLAG} {path}: a safetensors file without "
                              f"kvzap metadata (write one with vllm_kvcompress.train_scorer).")
    metadata = json.loads(raw)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ScorerFileError(
            f"{SCORER_FLAG} {path}: format version {metadata.get('format_version')!r}, "
            f"this plugin reads version {FORMAT_VERSION}; train it again.")
    return metadata


def mismatches(metadata: dict, hf_config) -> list[str]:
    """The identity fields on which the scorer and the model differ."""
    trained, model = metadata["model"]["identity"], model_identity(hf_config)
    return [f"{name} {trained.get(name)!r} (model: {model[name]!r})"
            for name in IDENTITY_FIELDS if trained.get(name) != model[name]]


def _train_hint(model_name: str) -> str:
    return (f"Train one with `python -m vllm_kvcompress.train_scorer {model_name} "
            f"--out FILE` and pass {SCORER_FLAG} FILE.")


def resolve_scorer(path: str | None, hf_config, model_name: str, required: bool
                   ) -> str | None:
    """The scorer file for this model: ``path`` if given (checked), else the
    bundled one whose identity matches. None if there is none and it is not
    ``required``; else a ``ScorerFileError`` that names the flag and the fix."""
    if path is not None:
        metadata = read_metadata(path)
        wrong = mismatches(metadata, hf_config)
        if wrong:
            raise ScorerFileError(
                f"{SCORER_FLAG} {path} was trained for {metadata['model']['name']}, "
                f"which differs from {model_name} in: {'; '.join(wrong)}. "
                + _train_hint(model_name))
        return str(path)
    for candidate in sorted(BUNDLED_DIR.glob("*.safetensors")):
        if not mismatches(read_metadata(candidate), hf_config):
            return str(candidate)
    if required:
        raise ScorerFileError(
            f"--kv-compress-policy kvzap needs a trained scorer for {model_name}, "
            "and none bundled with vllm_kvcompress matches it. " + _train_hint(model_name))
    return None


def load_scorer(path: str, device: torch.device | str = "cpu") -> LearnedScorer:
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    tensors = load_file(path, device=str(device))
    return LearnedScorer(tensors["weights"], tensors["bias"], metadata, path)
