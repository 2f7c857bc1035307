"""Which KVs of one request to evict, decided in whole head-blocks.

A head frees blocks from its tail only. Freeing its k-th block costs the KVs
of that block: ``hanging`` (the fill of its last block) for k = 1 and
``block_size`` after that, so freeing k blocks evicts its ``c_k`` lowest-
scored KVs. ``plan_variable`` is KV-Compress's selection: one ranking of every
(head, block) of the request, so heads with useless KVs give up more blocks.
``plan_uniform`` is the equal-count-per-head baseline. Torch, on whatever
device the scores live (no host round trip but the widest head's length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvictionPlan:
    # [L, H] int64: KVs each head keeps.
    new_lens: torch.Tensor
    # [L, H, M] bool: logical KV i of head (l, h) is evicted.
    evicted: torch.Tensor


def evictable_mask(positions, lens, seq_len: int, protected_window: int,
                   num_sinks: int) -> torch.Tensor:
    """KVs that may be evicted: held, older than the protected recent window,
    and not attention sinks. Judged by token position, since compaction
    reorders logical indices."""
    positions, lens = torch.as_tensor(positions), torch.as_tensor(lens)
    held = torch.arange(positions.shape[-1], device=lens.device) < lens[..., None]
    return (held & (positions < seq_len - protected_window)
            & (positions >= num_sinks))


def _hanging(lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """KVs in each head's last block (0 for an empty head)."""
    rest = lens % block_size
    return torch.where((rest == 0) & (lens > 0), block_size, rest)


def _rank_heads(scores: torch.Tensor, lens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head: logical indices in ascending score order (ties: lower index
    first), the sorted scores, and how many scores are finite. Slots past a
    head's length sort last as +inf."""
    held = torch.arange(scores.shape[-1], device=lens.device) < lens[..., None]
    padded = torch.where(held, scores, torch.inf)
    ranked, order = torch.sort(padded, dim=-1, stable=True)
    return order, ranked, torch.isfinite(ranked).sum(-1)


def _plan(order: torch.Tensor, lens: torch.Tensor, num_evicted: torch.Tensor
          ) -> EvictionPlan:
    """Evict the ``num_evicted`` lowest-ranked KVs of each head."""
    chosen = torch.arange(order.shape[-1], device=lens.device) < num_evicted[..., None]
    evicted = torch.zeros(order.shape, dtype=torch.bool, device=lens.device)
    evicted.scatter_(-1, order, chosen)
    return EvictionPlan(new_lens=lens - num_evicted, evicted=evicted)


def _evicted_for_blocks(freed: torch.Tensor, hanging: torch.Tensor,
                        block_size: int) -> torch.Tensor:
    """``c_k``: KVs evicted by freeing ``freed`` tail blocks of each head."""
    return torch.where(freed > 0, (freed - 1) * block_size + hanging, 0)


def _inputs(scores, lens) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores as float64 and lengths as int64, on the scores' device."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return scores, torch.as_tensor(lens, dtype=torch.int64, device=scores.device)


def plan_variable(scores, lens, block_size: int, max_evict: int) -> EvictionPlan:
    """Free the cheapest blocks of the request, ranked over all heads, while
    the evicted KVs stay within ``max_evict``.

    A block's score is the largest score it evicts, i.e. the ``c_k``-th lowest
    of its head; blocks that would evict a protected (+inf) KV do not exist.
    Runs on the scores' device; the only host value is the widest head.
    """
    scores, lens = _inputs(scores, lens)
    order, ranked, finite = _rank_heads(scores, lens)
    hanging = _hanging(lens, block_size)
    flat_ranked = ranked.reshape(lens.numel(), -1)
    max_blocks = max(-(-int(lens.max()) // block_size), 1) if lens.numel() else 1

    # Every candidate block (flat head index, k), in (head, k) order,
    # dropping those that would reach a protected KV or do not exist.
    candidates = torch.arange(lens.numel() * max_blocks, device=lens.device)
    head, k = candidates // max_blocks, candidates % max_blocks + 1
    flat_hanging = hanging.reshape(-1)[head]
    evicts = _evicted_for_blocks(k, flat_hanging, block_size)
    exists = (lens.reshape(-1)[head] > 0) & (evicts <= finite.reshape(-1)[head])
    head, k, evicts, flat_hanging = head[exists], k[exists], evicts[exists], flat_hanging[exists]
    score = flat_ranked[head, evicts - 1]

    # Cheapest first; a stable sort keeps (head, k) order on ties.
    taken = torch.sort(score, stable=True).indices
    cost = torch.where(k == 1, flat_hanging, block_size)[taken]
    taken = taken[torch.cumsum(cost, 0) <= max_evict]
    # Each head's blocks come in k order, so the count taken is its k.
    freed = torch.bincount(head[taken], minlength=lens.numel())
    num_evicted = _evicted_for_blocks(freed.reshape(lens.shape), hanging, block_size)
    return _plan(order, lens, num_evicted)


def plan_uniform(scores, lens, block_size: int, keep_per_head) -> EvictionPlan:
    """Free in each head the most tail blocks that still leave it at least
    ``keep_per_head`` KVs, evicting only finite-score ones."""
    scores, lens = _inputs(scores, lens)
    keep = torch.as_tensor(keep_per_head, dtype=torch.int64, device=lens.device)
    order, _, finite = _rank_heads(scores, lens)
    hanging = _hanging(lens, block_size)
    allowed = torch.minimum(lens - keep, finite)
    freed = torch.where((lens > 0) & (allowed >= hanging),
                        torch.div(allowed - hanging, block_size, rounding_mode="floor") + 1, 0)
    num_evicted = _evicted_for_blocks(freed, hanging, block_size)
    return _plan(order, lens, num_evicted)
