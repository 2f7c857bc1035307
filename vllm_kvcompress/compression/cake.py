"""CAKE (Qin et al., ICLR 2025): how much cache each layer deserves, and
which of its KVs matter, from the observation window's attention.

A layer whose window queries spread attention widely (high entropy) and
shift it from query to query (high variance) needs more KVs; a KV matters
when it is attended on average or erratically. Everything here starts from
``metrics.window_attention``'s probabilities, normalised over ALL of a
head's KVs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import pool_by_position

POOL_KERNEL = 5
LOG_EPS = 1e-10


@dataclass
class LayerStats:
    indicator: torch.Tensor  # [H, M] per-KV eviction score (lower goes first)
    entropy: float  # spatial dispersion H_l
    shift: float  # temporal shift V_l


@dataclass
class WindowSums:
    """One layer's window attention reduced over its queries: what CAKE's
    statistics need, from the probabilities (torch) or the statistics
    kernel alike."""

    sum_p: torch.Tensor  # [H, G, M] sum over the window queries of p
    sum_p2: torch.Tensor  # [H, G, M] sum of p**2
    entropy: float  # -sum p log p over the queries and the keys older than the window
    num_queries: int


def window_sums(probs: torch.Tensor, key_positions: torch.Tensor, lens: torch.Tensor,
                query_positions: torch.Tensor) -> WindowSums:
    """``WindowSums`` of ``window_attention``'s probabilities [H, G, W, M]
    (only real window queries). The entropy leaves the probabilities as they
    are (not renormalised over the older keys), as the reference does."""
    probs = probs.double()
    held = torch.arange(probs.shape[-1], device=lens.device)[None, :] < lens[:, None]
    older = (held & (key_positions < query_positions.min()))[:, None, None, :]
    prefix = probs * older
    entropy = -(prefix * torch.log(prefix + LOG_EPS)).sum()
    return WindowSums(probs.sum(dim=2), probs.square().sum(dim=2), float(entropy),
                      probs.shape[2])


def layer_statistics(sums: WindowSums, key_positions: torch.Tensor, lens: torch.Tensor,
                     query_positions: torch.Tensor, gamma: float) -> LayerStats:
    """CAKE's statistics of one layer of one request.

    key_positions [H, M]; lens [H]; query_positions [W]. The shift sums the
    variance across queries (unbiased; 0 for a single query, where it is
    undefined) over the keys older than the window; the indicator covers
    every held KV.
    """
    n = sums.num_queries
    sum_p, sum_p2 = sums.sum_p.double(), sums.sum_p2.double()
    mean = sum_p / n
    variance = ((sum_p2 - sum_p * mean) / (n - 1)).clamp(min=0) if n > 1 else (
        torch.zeros_like(sum_p))  # [H, G, M]
    held = torch.arange(sum_p.shape[-1], device=lens.device)[None, :] < lens[:, None]
    older = held & (key_positions < query_positions.min())
    shift = (variance * older[:, None, :]).sum()
    indicator = (mean + gamma * variance) * held[:, None]
    pooled = pool_by_position(
        indicator, key_positions, lens,
        lambda x: F.avg_pool1d(x, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2))
    pooled = pooled.mean(dim=1) * held  # padding counts as 0, like the pool's own
    return LayerStats(pooled.float(), sums.entropy, float(shift))


def preference_weights(entropy: np.ndarray, shift: np.ndarray,
                       tau1: float, tau2: float) -> np.ndarray:
    """Layer preferences P_l = H_l**(1/tau1) * V_l**(1/tau2), scaled so the
    largest is 1. Worked out in logs: small taus overflow the powers, and
    only the ratios matter. A layer with a zero (or non-finite) statistic
    gets 0; if every layer does, all are 0 and the split is even."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(entropy) / tau1 + np.log(shift) / tau2
    logs = np.where(np.isnan(logs) | (logs == np.inf), -np.inf, logs)
    if not np.isfinite(logs).any():
        return np.zeros(len(logs))
    return np.exp(logs - logs.max())
