"""The trainer's side of the worker: kvzip's pass as the teacher.

Installed on a running engine's compressor (``train_scorer`` does it
through ``LLM.collective_rpc``), it sees every kvzip pass's fresh scores
and adds the held KVs' features and log scores to running ridge sums, one
set per split. Only a request's first pass counts, while every head still
holds every token, so a sample is one token of one layer with the scores
of all its heads.
"""

from __future__ import annotations

import torch

from .features import RotarySpec, token_features
from .ridge import RidgeSums

# kvzip's scores are best probabilities; the target is their log, floored.
SCORE_FLOOR = 1e-6


def log_score(scores: torch.Tensor) -> torch.Tensor:
    """The regression target of kvzip scores."""
    return scores.float().clamp_min(SCORE_FLOOR).log()


class TeacherCapture:
    def __init__(self, pool, layout: str, rotary: RotarySpec, num_layers: int,
                 num_heads: int, num_features: int, skip_first: int):
        self.pool, self.layout, self.rotary = pool, layout, rotary
        self.skip_first = skip_first  # attention sinks: kvzip never evicts them
        self.sums = {split: RidgeSums(num_layers, num_features, num_heads)
                     for split in ("train", "validation")}
        self.split = "train"
        self.requests = {split: 0 for split in self.sums}
        self.tokens = {split: 0 for split in self.sums}

    def __call__(self, scores: torch.Tensor, slots: torch.Tensor,
                 in_head: torch.Tensor, positions: torch.Tensor) -> None:
        """One kvzip pass: ``scores`` / ``slots`` / ``in_head`` /
        ``positions`` [L, H, M] by logical index."""
        whole = in_head.all(dim=(0, 1)) & (positions == positions[:1, :1]).all(dim=(0, 1))
        if not bool(whole[in_head.any(dim=(0, 1))].all()):
            return  # compressed before: heads no longer hold the same tokens
        taken = whole & (positions[0, 0] >= self.skip_first)
        keys, values = self.pool.gather(slots[:, :, taken], self.layout)
        sums = self.sums[self.split]
        for layer in range(scores.shape[0]):
            features = token_features(keys[layer], values[layer], self.rotary)
            sums.add(layer, features, log_score(scores[layer][:, taken]).T)
        self.requests[self.split] += 1
        self.tokens[self.split] += int(taken.sum())
