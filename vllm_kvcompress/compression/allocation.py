"""How a policy shares one request's eviction out over layers and heads.

Every allocation receives the request's scores (protected KVs at +inf), its
per-head lengths and what may go (``budget`` KVs now, keeping ``target``),
and returns the plan in whole head-blocks (``planner.py``):
- ``GlobalRanking``: one ranking of every (layer, head) block of the
  request (KV-Compress; kvzip and kvzap rank this way);
- ``PerLayer``: the target sliced over layers first (CAKE's preference,
  PyramidKV's pyramid, Ada-KV's equal split), then each layer planned
  alone, its heads ranked against each other or given equal counts;
- ``EqualCount``: the same count in every head (SnapKV, StreamingLLM).
A score threshold, KVzap's own rule, is not a separate allocation here: at
a given memory it keeps the same KVs as ``GlobalRanking`` (the best-scored
over all heads); only the memory would vary per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .budget import kept_target
from .layer_budgets import layer_weights, plan_by_layer
from .planner import EvictionPlan, plan_uniform, plan_variable


def keep_best(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Protect (score +inf) each head's ``count`` best-scored KVs, so a single
    ranking across heads cannot strip any head below that floor."""
    scores = torch.as_tensor(scores)
    ranked = torch.where(torch.isfinite(scores), scores, -torch.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    best = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    best.scatter_(-1, order[..., :count], True)
    return torch.where(best, torch.inf, scores)


@dataclass(frozen=True)
class Request:
    """One request's eviction problem, as every allocation sees it."""

    settings: object  # the request's KVCompressConfig
    scores: torch.Tensor  # [L, H, M] float64, +inf where protected
    lens: torch.Tensor  # [L, H] int64
    evictable: torch.Tensor  # [L, H, M] bool
    budget: int  # KVs that may go now (> 0)
    target_tokens: int  # the length the kept target is measured on
    block_size: int
    preference: np.ndarray | None = None  # CAKE's layer weights

    @property
    def heads(self) -> int:
        return self.lens.numel()


class GlobalRanking:
    """KV-Compress's selection, with the optional per-head floor
    (``--kv-compress-head-floor``)."""

    def plan(self, request: Request) -> EvictionPlan:
        scores = request.scores
        if request.settings.head_floor > 0:
            average = (int(request.lens.sum()) - request.budget) / request.heads
            scores = keep_best(scores, math.ceil(request.settings.head_floor * average))
        return plan_variable(scores, request.lens, request.block_size, request.budget)


@dataclass(frozen=True)
class PerLayer:
    split: str  # "preference", "pyramid" or "equal" (``layer_budgets.layer_weights``)
    variable: bool  # heads of a layer ranked together, else equal counts

    def plan(self, request: Request) -> EvictionPlan:
        weights = layer_weights(self.split, len(request.lens), request.preference)
        target = kept_target(request.settings, request.target_tokens, request.heads)
        return plan_by_layer(request.scores, request.lens, request.evictable, target,
                             weights, request.block_size, self.variable)


class EqualCount:
    def plan(self, request: Request) -> EvictionPlan:
        keep = math.ceil((int(request.lens.sum()) - request.budget) / request.heads)
        return plan_uniform(request.scores, request.lens, request.block_size, keep)
