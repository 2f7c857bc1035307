"""Attention statistics of the observation window, per KV, on CPU (torch).

For each KV head, the window queries of its GQA group are scored against ALL
of that head's KVs (softmax over every visible key, never repeating KVs per
query head); KV-Compress's metric is the squared probability summed over the
window and over the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_attention(
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    lens: torch.Tensor,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Sum over window queries and group heads of p**2, per KV.

    keys [H, M, D]; key_positions [H, M]; lens [H] (KVs beyond are padding);
    queries [W, H, G, D]; query_positions [W]. A query sees the keys whose
    token position is not after its own. Returns [H, M] float32.
    """
    scores = torch.einsum("whgd,hmd->hgwm", queries.float(), keys.float()) * scale
    in_head = torch.arange(keys.shape[1])[None, :] < lens[:, None]  # [H, M]
    causal = key_positions[:, None, :] <= query_positions[None, :, None]  # [H, W, M]
    visible = (in_head[:, None, :] & causal)[:, None]  # [H, 1, W, M]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key
    return probs.square().sum(dim=(1, 2))


def max_pool_keys(metric: torch.Tensor, lens: torch.Tensor, kernel: int = 7) -> torch.Tensor:
    """SnapKV-style max-pooling along each head's KVs (in logical order)."""
    in_head = torch.arange(metric.shape[1])[None, :] < lens[:, None]
    padded = metric.masked_fill(~in_head, float("-inf"))
    pooled = F.max_pool1d(padded[:, None, :], kernel, stride=1, padding=kernel // 2)
    return pooled[:, 0].masked_fill(~in_head, 0.0)
