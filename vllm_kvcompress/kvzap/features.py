"""What the learned scorer reads of a KV: what the pool already holds.

Keys sit in the pool after the rotary embedding, which turns each pair of
rotary dimensions by an angle that depends on the token's position. The
length of each pair does not depend on it, so a key's features are its
rotary pairs' norms (plus any dimensions the rotation leaves alone); a
value is taken whole. One token's features in one layer are those of ALL
the layer's KV heads, concatenated (a head's score is predicted from every
head of its layer, as KVzap predicts from the layer's whole hidden state).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Feature sets the trainer measures; "all" is the one a scorer uses unless
# told otherwise (the trainer's validation table says why).
FEATURE_SETS = ("all", "own_head", "keys", "values")


@dataclass(frozen=True)
class RotarySpec:
    """How the model's rotary embedding pairs a head's dimensions: ``neox``
    turns (i, i + dim/2), ``gptj`` turns (2i, 2i + 1), over the first
    ``dim`` dimensions."""

    dim: int
    neox: bool

    def to_json(self) -> dict:
        return asdict(self)


def rotary_spec_of(model: torch.nn.Module, head_dim: int) -> RotarySpec:
    """The rotary embedding vLLM's model uses (its first one); a model
    without one has no turned dimensions."""
    for module in model.modules():
        if hasattr(module, "is_neox_style") and hasattr(module, "rotary_dim"):
            return RotarySpec(int(module.rotary_dim), bool(module.is_neox_style))
    return RotarySpec(0, True)


def key_features(keys: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
    """Position-free features of post-rotary keys ``[..., D]``: each rotary
    pair's norm, then the unturned dimensions: ``[..., D - dim/2]``."""
    keys = keys.float()
    turned, rest = keys[..., : rotary.dim], keys[..., rotary.dim:]
    if rotary.neox:
        first, second = turned.chunk(2, dim=-1)
    else:
        first, second = turned[..., 0::2], turned[..., 1::2]
    return torch.cat([torch.hypot(first, second), rest], dim=-1)


def token_features(keys: torch.Tensor, values: torch.Tensor,
                   rotary: RotarySpec) -> torch.Tensor:
    """One layer's features per token: keys / values ``[H, M, D]`` ->
    ``[M, H * (Fk + D)]``, ordered head by head, each head's key features
    then its value."""
    per_head = torch.cat([key_features(keys, rotary), values.float()], dim=-1)
    return per_head.transpose(0, 1).reshape(keys.shape[1], -1)


def feature_columns(feature_set: str, num_heads: int, head_dim: int,
                    rotary: RotarySpec, head: int) -> list[int]:
    """Which of ``token_features``' columns predict head ``head``'s score
    under ``feature_set`` (see ``FEATURE_SETS``)."""
    key_width = head_dim - rotary.dim // 2
    width = key_width + head_dim
    heads = [head] if feature_set == "own_head" else range(num_heads)
    parts = {"all": (0, width), "own_head": (0, width), "keys": (0, key_width),
             "values": (key_width, width)}
    if feature_set not in parts:
        raise ValueError(f"unknown feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    first, last = parts[feature_set]
    return [h * width + c for h in heads for c in range(first, last)]
