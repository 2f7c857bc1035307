"""Attention statistics of the observation window, per KV, on CPU (torch).

For each KV head, the window queries of its GQA group are scored against ALL
of that head's KVs (softmax over every visible key, never repeating KVs per
query head). KV-Compress's metric is the squared probability summed over the
window and over the group; CAKE's statistics (``cake.py``) start from the
same probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_attention(
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    lens: torch.Tensor,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention probabilities of the window queries, [H, G, W, M] float32.

    keys [H, M, D]; key_positions [H, M]; lens [H] (KVs beyond are padding);
    queries [W, H, G, D]; query_positions [W]. A query sees the keys whose
    token position is not after its own; keys it cannot see (and padding)
    get probability 0.
    """
    scores = torch.einsum("whgd,hmd->hgwm", queries.float(), keys.float()) * scale
    in_head = torch.arange(keys.shape[1], device=lens.device)[None, :] < lens[:, None]  # [H, M]
    causal = key_positions[:, None, :] <= query_positions[None, :, None]  # [H, W, M]
    visible = (in_head[:, None, :] & causal)[:, None]  # [H, 1, W, M]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key


def squared_attention(probs: torch.Tensor) -> torch.Tensor:
    """KV-Compress's metric from ``window_attention``'s probabilities: p**2
    summed over the window queries and the group heads, per KV: [H, M]."""
    return probs.square().sum(dim=(1, 2))


def pool_by_position(values: torch.Tensor, key_positions: torch.Tensor,
                     lens: torch.Tensor, pool) -> torch.Tensor:
    """Apply ``pool`` ([N, 1, M] -> [N, 1, M]) along each head's KVs in
    token-position order.

    values [H, ..., M]; key_positions [H, M]; lens [H]. Compaction leaves a
    head's KVs out of position order, so neighbours are found by sorting on
    position; padding sorts last.
    """
    held = torch.arange(values.shape[-1], device=lens.device)[None, :] < lens[:, None]
    last = torch.iinfo(torch.int64).max
    order = torch.argsort(torch.where(held, key_positions.long(), last), dim=-1)
    middle = values.shape[1:-1]
    order = order.view(order.shape[0], *([1] * len(middle)), -1).expand(values.shape)
    ranked = torch.gather(values, -1, order).reshape(-1, 1, values.shape[-1])
    pooled = pool(ranked).reshape(values.shape)
    return torch.empty_like(values).scatter_(-1, order, pooled)


def max_pool_keys(metric: torch.Tensor, key_positions: torch.Tensor,
                  lens: torch.Tensor, kernel: int = 7) -> torch.Tensor:
    """SnapKV-style max-pooling of [H, M] along each head's KVs, neighbours
    by token position; padding never wins and stays 0."""
    in_head = torch.arange(metric.shape[1], device=lens.device)[None, :] < lens[:, None]
    padded = metric.masked_fill(~in_head, float("-inf"))
    pooled = pool_by_position(
        padded, key_positions, lens,
        lambda x: F.max_pool1d(x, kernel, stride=1, padding=kernel // 2))
    return pooled.masked_fill(~in_head, 0.0)
