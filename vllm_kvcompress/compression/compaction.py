"""Packing each head's surviving KVs into a prefix of its blocks.

After a plan evicts KVs, survivors that sit at or past a head's new length
are copied into the holes that evicted KVs left below it, so the head's KVs
again fill its first ``new_len`` logical slots and its tail blocks can be
freed. KV order is not kept: RoPE is applied before caching and the token
position moves with the KV, so attention does not depend on it.

The copies go straight into vLLM's CPU cache layout, which ``probe_layout``
determines from the kernel itself rather than assuming it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention import cpu_paged
from ..attention.pool import HeadBlockCache
from ..head_table import HeadTable
from .planner import EvictionPlan

LAYOUTS = ("k_transposed", "row_major")


def compaction_moves(evicted_row: np.ndarray, length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One head's (src, dst) logical indices: each survivor at or past the new
    length fills the lowest evicted index below it (both ascending)."""
    evicted = np.asarray(evicted_row[:length], dtype=bool)
    new_len = length - int(evicted.sum())
    dst = np.flatnonzero(evicted[:new_len])
    src = new_len + np.flatnonzero(~evicted[new_len:])
    return src.astype(np.int64), dst.astype(np.int64)


def _move_masks(plan: EvictionPlan) -> tuple[np.ndarray, np.ndarray]:
    """[L, H, M] masks of the sources and destinations of every head."""
    index = np.arange(plan.evicted.shape[-1])
    old_lens = plan.new_lens + plan.evicted.sum(-1)
    below = index < plan.new_lens[..., None]
    held = index < old_lens[..., None]
    return ~plan.evicted & held & ~below, plan.evicted & below


def slot_moves(table: HeadTable, plan: EvictionPlan) -> np.ndarray:
    """[M, 2] (src_slot, dst_slot) over all heads of one request.

    Within a head the k-th source pairs with the k-th destination; row-major
    ``nonzero`` lists both head by head in ascending index, and every head has
    as many sources as destinations, so the two lists line up.
    """
    src_mask, dst_mask = _move_masks(plan)
    bs = table.block_size

    def slots(mask: np.ndarray) -> np.ndarray:
        layer, head, logical = np.nonzero(mask)
        blocks = table.table[layer, head, logical // bs].astype(np.int64)
        return blocks * bs + logical % bs

    return np.stack([slots(src_mask), slots(dst_mask)], axis=1).reshape(-1, 2)


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


def probe_layout(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> str:
    """Where vLLM's cache-write kernel puts K and V inside a head-block.

    Writes one block of distinct values through the kernel into a scratch
    pool and matches it against the layouts ``apply_moves`` understands.
    """
    pool = HeadBlockCache.empty(1, block_size, head_dim, dtype)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(block_size, head_dim, generator=gen).to(dtype)
    value = torch.randn(block_size, head_dim, generator=gen).to(dtype)
    slots = torch.arange(block_size, dtype=torch.int64)[:, None]
    cpu_paged.write_cache(pool, key[:, None], value[:, None], slots, isa)
    stored_key, stored_value = pool.kv[0, 0].reshape(2, -1)
    if torch.equal(stored_value, value.reshape(-1)):
        if torch.equal(stored_key, key.T.reshape(-1)):
            return "k_transposed"
        if torch.equal(stored_key, key.reshape(-1)):
            return "row_major"
    raise RuntimeError(
        f"vLLM's CPU cache kernel (isa={isa!r}, block_size={block_size}, "
        f"head_dim={head_dim}, dtype={dtype}) stores K/V in a layout that KV "
        "compaction does not know; compression cannot move KVs in this cache"
    )
