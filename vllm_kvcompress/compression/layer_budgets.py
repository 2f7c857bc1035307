"""Per-layer budgets: a request's kept target sliced across its layers (by
CAKE's preferences or PyramidKV's pyramid), then each layer planned alone.

Budgets count KVs over all heads of a layer. The slicing follows the
reference implementations, which give out only the non-window part of the
cache by weight and keep the window in every layer on top: here each layer
is first given its protected KVs (never evictable: the recent window and the
sinks), and only the rest of the target is sliced by weight. A layer thus
never gets a budget it cannot honour; when the protected KVs alone pass the
target, every layer keeps just those.
"""

from __future__ import annotations

import numpy as np
import torch

from .planner import EvictionPlan, plan_uniform, plan_variable

PYRAMID_BETA = 20


def pyramid_weights(num_layers: int, beta: float = PYRAMID_BETA) -> np.ndarray:
    """PyramidKV's shape: averaging 1, the last layer gets 1/beta and the
    first 2 - 1/beta, linear in between."""
    if num_layers == 1:
        return np.ones(1)
    return np.linspace(2 - 1 / beta, 1 / beta, num_layers)


def layer_weights(kind: str, num_layers: int,
                  preference: np.ndarray | None = None) -> np.ndarray:
    """A policy's layer split: "preference" (CAKE's, computed from this
    window's attention and passed in), "pyramid" or "equal" (Ada-KV)."""
    if kind == "preference":
        return preference
    if kind == "pyramid":
        return pyramid_weights(num_layers)
    if kind == "equal":
        return np.ones(num_layers)
    raise ValueError(f"unknown layer split {kind!r}")


def allocate(weights: np.ndarray, total: int, floors: np.ndarray,
             caps: np.ndarray) -> np.ndarray:
    """Integer budgets, ``floors <= b <= caps``, summing exactly to
    ``total`` clipped to ``[floors.sum(), caps.sum()]``.

    Each layer gets its floor plus a share of the rest proportional to its
    weight; a layer whose share passes its cap stops there and its excess is
    re-split over the others. Shares are rounded by largest remainder.
    Zero, negative or non-finite weights count as 0; when no open layer has
    a positive weight the rest is split evenly.
    """
    floors = np.asarray(floors, dtype=np.int64)
    room = np.maximum(np.asarray(caps, dtype=np.int64) - floors, 0)
    rest = int(np.clip(total - floors.sum(), 0, room.sum()))
    weights = np.asarray(weights, dtype=np.float64)
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    share = np.zeros(len(room))
    open_ = room > 0
    left = float(rest)
    while open_.any():
        weight = np.where(open_, weights, 0.0)
        if weight.sum() <= 0:
            weight = open_.astype(np.float64)
        trial = left * weight / weight.sum()
        full = open_ & (trial >= room)
        if not full.any():
            share[open_] = trial[open_]
            break
        share[full] = room[full]
        left -= float(room[full].sum())
        open_ &= ~full
    base = np.minimum(np.floor(share).astype(np.int64), room)
    # Largest remainders first (earlier layers on ties), never past a cap.
    remainder = np.where(base < room, share - base, -1.0)
    extra = np.argsort(-remainder, kind="stable")[: rest - int(base.sum())]
    base[extra] += 1
    return floors + base


def plan_by_layer(scores: torch.Tensor, lens: torch.Tensor, evictable: torch.Tensor,
                  target: int, weights: np.ndarray, block_size: int,
                  variable: bool) -> EvictionPlan:
    """Slice ``target`` (KVs over all heads) across layers by ``weights``
    (see ``allocate``, floored at each layer's protected KVs and capped at
    what it holds) and plan each layer to its budget.

    Within a layer, ``variable`` splits the eviction across heads by one
    block ranking (KV-Compress); otherwise the budget is split evenly over
    the heads by the same ``allocate`` (a head shorter than its share keeps
    all it has and the others make up for it). Either way a layer keeps at
    least its budget and, whole blocks going, less than one block per head
    more. The split itself is host arithmetic over L (and H) numbers.
    """
    scores = torch.as_tensor(scores)
    lens = torch.as_tensor(lens, device=scores.device)
    head_protected = lens - torch.as_tensor(evictable, device=scores.device).sum(dim=2)
    host_lens, host_protected = lens.cpu().numpy(), head_protected.cpu().numpy()
    held, protected = host_lens.sum(axis=1), host_protected.sum(axis=1)
    budgets = allocate(weights, target, protected, held)
    plans = []
    for layer, budget in enumerate(budgets):
        layer_scores, layer_lens = scores[layer:layer + 1], lens[layer:layer + 1]
        if variable:
            plans.append(plan_variable(layer_scores, layer_lens, block_size,
                                       int(held[layer] - budget)))
        else:
            keep = allocate(np.ones(lens.shape[1]), int(budget),
                            host_protected[layer], host_lens[layer])
            plans.append(plan_uniform(layer_scores, layer_lens, block_size, keep[None]))
    return EvictionPlan(new_lens=torch.cat([p.new_lens for p in plans]),
                        evicted=torch.cat([p.evicted for p in plans]))
