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


def _query_variance(probs: torch.Tensor) -> torch.Tensor:
    """Unbiased variance across the window queries (dim 2); 0 when there is
    a single query, where it is undefined."""
    if probs.shape[2] < 2:
        return torch.zeros_like(probs.sum(2))
    return probs.var(dim=2, correction=1)


def layer_statistics(probs: torch.Tensor, key_positions: torch.Tensor,
                     lens: torch.Tensor, query_positions: torch.Tensor,
                     gamma: float) -> LayerStats:
    """CAKE's statistics of one layer of one request.

    probs [H, G, W, M] from ``window_attention`` (only real window queries);
    key_positions [H, M]; lens [H]; query_positions [W]. Entropy and shift
    use the window queries against the keys older than the window, with the
    probabilities left as they are (not renormalised), as the reference
    does. The indicator covers every held KV.
    """
    probs = probs.double()
    held = torch.arange(probs.shape[-1])[None, :] < lens[:, None]  # [H, M]
    older = (held & (key_positions < query_positions.min()))[:, None, None, :]
    prefix = probs * older
    entropy = -(prefix * torch.log(prefix + LOG_EPS)).sum()
    variance = _query_variance(probs)  # [H, G, M]
    shift = (variance * older[:, :, 0]).sum()
    indicator = (probs.mean(dim=2) + gamma * variance) * held[:, None]
    pooled = pool_by_position(
        indicator, key_positions, lens,
        lambda x: F.avg_pool1d(x, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2))
    pooled = pooled.mean(dim=1) * held  # padding counts as 0, like the pool's own
    return LayerStats(pooled.float(), float(entropy), float(shift))


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
