"""Packing each head's surviving KVs into a prefix of its blocks.

After a plan evicts KVs, survivors that sit at or past a head's new length
are copied into the holes that evicted KVs left below it, so the head's KVs
again fill its first ``new_len`` logical slots and its tail blocks can be
freed. KV order is not kept: RoPE is applied before caching and the token
position moves with the KV, so attention does not depend on it.

The copies themselves are an attention op (``move_slots``), since only the
ops know how K and V are packed inside a head-block.
"""

from __future__ import annotations

import numpy as np
import torch

from ..head_table import HeadTable
from .planner import EvictionPlan


def compaction_moves(evicted_row: np.ndarray, length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One head's (src, dst) logical indices: each survivor at or past the new
    length fills the lowest evicted index below it (both ascending)."""
    evicted = np.asarray(evicted_row[:length], dtype=bool)
    new_len = length - int(evicted.sum())
    dst = np.flatnonzero(evicted[:new_len])
    src = new_len + np.flatnonzero(~evicted[new_len:])
    return src.astype(np.int64), dst.astype(np.int64)


def _move_masks(plan: EvictionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, H, M] masks of the sources and destinations of every head."""
    index = torch.arange(plan.evicted.shape[-1], device=plan.evicted.device)
    old_lens = plan.new_lens + plan.evicted.sum(-1)
    below = index < plan.new_lens[..., None]
    held = index < old_lens[..., None]
    return ~plan.evicted & held & ~below, plan.evicted & below


def slot_moves(table: HeadTable, plan: EvictionPlan,
               ids: torch.Tensor | None = None) -> torch.Tensor:
    """[M, 2] int64 (src_slot, dst_slot) over all heads of one request, on
    the plan's device (``ids``: the table's block ids already there).

    Within a head the k-th source pairs with the k-th destination; row-major
    ``nonzero`` lists both head by head in ascending index, and every head has
    as many sources as destinations, so the two lists line up.
    """
    src_mask, dst_mask = _move_masks(plan)
    bs = table.block_size
    if ids is None:
        ids = torch.as_tensor(table.table, device=plan.evicted.device).long()

    def slots(mask: torch.Tensor) -> torch.Tensor:
        layer, head, logical = torch.nonzero(mask, as_tuple=True)
        return ids[layer, head, logical // bs] * bs + logical % bs

    return torch.stack([slots(src_mask), slots(dst_mask)], dim=1).reshape(-1, 2)
