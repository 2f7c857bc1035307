"""Moving KVs between slots of the head-block pool (compaction), in plain
torch on whatever device the pool lives: K, V and the per-slot metric and
position travel together."""

from __future__ import annotations

import torch

from ..pool_view import HeadBlockCache

LAYOUTS = ("k_transposed", "row_major")


def _split(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return slots // block_size, slots % block_size


def apply_moves(pool: HeadBlockCache, moves: torch.Tensor,
                kv_metric: torch.Tensor | None = None,
                kv_position: torch.Tensor | None = None,
                layout: str = "k_transposed") -> None:
    """Copy K, V and the optional per-slot metric and position [P, bs] from
    each move's source slot to its destination slot.

    All sources are read before any destination is written; sources and
    destinations of a plan are disjoint, so the order of moves is irrelevant.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown KV cache layout {layout!r}; expected {LAYOUTS}")
    if moves.numel() == 0:
        return
    moves = moves.long()
    src_block, src_off = _split(moves[:, 0], pool.block_size)
    dst_block, dst_off = _split(moves[:, 1], pool.block_size)
    key, value = pool.packed_views(layout)
    # The key view is [P, D, bs] when transposed: index (block, :, offset).
    if layout == "k_transposed":
        key[dst_block, :, dst_off] = key[src_block, :, src_off]
    else:
        key[dst_block, dst_off] = key[src_block, src_off]
    value[dst_block, dst_off] = value[src_block, src_off]
    for per_slot in (kv_metric, kv_position):
        if per_slot is not None:
            per_slot[dst_block, dst_off] = per_slot[src_block, src_off]
