"""Scores that read no attention: StreamingLLM's (oldest first) and the
random baseline's."""

from __future__ import annotations

import torch

from .base import Scored, Scorer, ScoringContext


class Oldest(Scorer):
    name = "oldest"

    def score(self, context: ScoringContext) -> Scored:
        return Scored(context.positions.double())


class Random(Scorer):
    name = "random"

    def score(self, context: ScoringContext) -> Scored:
        positions = context.positions
        return Scored(torch.rand(positions.shape, generator=context.compressor.rng,
                                 dtype=torch.float64, device=positions.device))
