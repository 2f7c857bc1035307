"""Eviction policies: each turns per-KV statistics into scores (lower goes
first) and says how blocks are shared out across layers and heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Policy:
    name: str
    # True: heads keep different amounts, by one ranking of (head, block)
    # chunks (KV-Compress). False: the same count in every head.
    variable: bool
    # The per-KV statistic of the window queries scores come from:
    # "squared" (summed squared attention, KV-Compress/SnapKV), "cake"
    # (CAKE's mean + gamma * variance), "reconstruction" (KVzip: the
    # worker's reconstruction pass fills it), or None (no attention needed).
    metric: str | None
    # How the request's kept target is split over layers: None (not split:
    # the ranking or the equal count spans all layers), "preference" (CAKE's
    # attention entropy and variance), "pyramid" (PyramidKV, shrinking with
    # depth), "equal" (the same for every layer, as Ada-KV does).
    layer_budgets: str | None = None
    min_sinks: int = 0

    @property
    def reads_window(self) -> bool:
        """Scored from the observation window's attention."""
        return self.metric in ("squared", "cake")

    def scores(self, metric: torch.Tensor, positions: torch.Tensor,
               rng: torch.Generator) -> torch.Tensor:
        """[L, H, M] float64 scores on the metric's device (lower goes first)."""
        if self.metric is not None:
            return metric.double()
        if self.name == "streamingllm":  # oldest first
            return positions.double()
        return torch.rand(positions.shape, generator=rng, dtype=torch.float64,
                          device=positions.device)


POLICIES = {
    "kvcompress": Policy("kvcompress", variable=True, metric="squared"),
    "cake": Policy("cake", variable=True, metric="cake", layer_budgets="preference"),
    # Ada-KV's split: equal layer quotas, heads of a layer ranked against
    # each other; isolates what kvcompress's cross-layer ranking changes.
    "adakv": Policy("adakv", variable=True, metric="squared", layer_budgets="equal"),
    # KVzip: query-agnostic scores from re-reading the context, one ranking
    # across all layers and heads; the first 4 tokens kept as sinks.
    "kvzip": Policy("kvzip", variable=True, metric="reconstruction", min_sinks=4),
    "snapkv": Policy("snapkv", variable=False, metric="squared"),
    "pyramidkv": Policy("pyramidkv", variable=False, metric="squared",
                        layer_budgets="pyramid"),
    "streamingllm": Policy("streamingllm", variable=False, metric=None, min_sinks=4),
    "random": Policy("random", variable=False, metric=None),
}
