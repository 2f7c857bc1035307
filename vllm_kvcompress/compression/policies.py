"""Eviction policies: each turns per-KV statistics into scores (lower goes
first) and says how blocks are shared out across heads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Policy:
    name: str
    # True: one ranking over all (layer, head, block) chunks, so heads keep
    # different amounts (KV-Compress). False: the same count in every head.
    variable: bool
    # True: scores come from attention statistics of the window queries.
    needs_attention: bool
    min_sinks: int = 0

    def scores(self, metric: np.ndarray, positions: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
        if self.needs_attention:
            return metric.astype(np.float64)
        if self.name == "streamingllm":  # oldest first
            return positions.astype(np.float64)
        return rng.random(positions.shape)


POLICIES = {
    "kvcompress": Policy("kvcompress", variable=True, needs_attention=True),
    "snapkv": Policy("snapkv", variable=False, needs_attention=True),
    "streamingllm": Policy("streamingllm", variable=False, needs_attention=False,
                           min_sinks=4),
    "random": Policy("random", variable=False, needs_attention=False),
}
