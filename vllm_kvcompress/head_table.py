"""One request's per-(layer, KV head) block table and lengths.

The scheduler's head-block manager and the worker's mirror both keep one
``HeadTable`` per request and change it through the same methods, so the two
sides compute identical tables from identical messages.
"""

from __future__ import annotations

import numpy as np


class HeadTable:
    """Block ids and KV counts of every (layer, KV head) of one request.

    ``table[l, h, :nblocks[l, h]]`` are the head-blocks of layer l, KV head h,
    in logical order; its KVs fill the first ``lens[l, h]`` slots of them.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int):
        self.block_size = block_size
        self.table = np.zeros((num_layers, num_kv_heads, 4), dtype=np.int32)
        self.nblocks = np.zeros((num_layers, num_kv_heads), dtype=np.int64)
        self.lens = np.zeros((num_layers, num_kv_heads), dtype=np.int64)

    @classmethod
    def from_arrays(cls, table: np.ndarray, nblocks: np.ndarray, lens: np.ndarray,
                    block_size: int) -> "HeadTable":
        """A table over given arrays (the worker's copy of one batch row)."""
        made = cls(*lens.shape, block_size)
        made.table, made.nblocks, made.lens = table, nblocks, lens
        return made

    @property
    def shape(self) -> tuple[int, int]:
        return self.lens.shape  # type: ignore[return-value]

    def blocks_short(self, num_new_tokens: int) -> np.ndarray:
        """Blocks each head lacks to hold ``num_new_tokens`` more KVs."""
        needed = -(-(self.lens + num_new_tokens) // self.block_size)
        return np.maximum(needed - self.nblocks, 0)

    def append_blocks(self, counts: np.ndarray, block_ids: np.ndarray) -> None:
        """Append ``counts[l, h]`` ids to each head, taken in (l, h) order."""
        counts = counts.reshape(-1).astype(np.int64)
        total = int(counts.sum())
        if total != len(block_ids):
            raise ValueError(f"{total} blocks granted but {len(block_ids)} ids sent")
        if total == 0:
            return
        self._reserve(int((self.nblocks.reshape(-1) + counts).max()))
        num_heads = counts.size
        head = np.repeat(np.arange(num_heads), counts)
        first = np.cumsum(counts) - counts
        column = self.nblocks.reshape(-1)[head] + np.arange(total) - first[head]
        flat = self.table.reshape(num_heads, -1)
        flat[head, column] = block_ids
        self.nblocks += counts.reshape(self.nblocks.shape)

    def _reserve(self, capacity: int) -> None:
        if capacity <= self.table.shape[2]:
            return
        grown = np.zeros(
            self.table.shape[:2] + (max(capacity, 2 * self.table.shape[2]),),
            dtype=np.int32,
        )
        grown[:, :, : self.table.shape[2]] = self.table
        self.table = grown

    def truncate(self, new_lens: np.ndarray) -> np.ndarray:
        """Shrink every head to ``new_lens`` KVs (compaction has already moved
        the survivors into a prefix); returns the tail block ids let go."""
        if (new_lens > self.lens).any() or (new_lens < 0).any():
            raise ValueError("a head cannot grow by eviction")
        keep = -(-new_lens // self.block_size)
        dropped = (np.arange(self.table.shape[2]) >= keep[..., None]) & (
            np.arange(self.table.shape[2]) < self.nblocks[..., None]
        )
        ids = self.table[dropped]
        self.nblocks = keep.astype(np.int64)
        self.lens = new_lens.astype(np.int64)
        return ids

    def held_ids(self) -> np.ndarray:
        """Every head-block id of the request (any order)."""
        mask = np.arange(self.table.shape[2]) < self.nblocks[..., None]
        return self.table[mask]

    def new_token_slots(self, num_new_tokens: int) -> np.ndarray:
        """Slots ``[L, num_new_tokens, H]`` that the next tokens' KVs go to."""
        if (self.lens + num_new_tokens > self.nblocks * self.block_size).any():
            raise RuntimeError(
                "head-block table too short for the scheduled tokens: the "
                "scheduler and the worker disagree about this request"
            )
        logical = self.lens[:, None, :] + np.arange(num_new_tokens)[None, :, None]
        block_index = logical // self.block_size
        layers = np.arange(self.lens.shape[0])[:, None, None]
        heads = np.arange(self.lens.shape[1])[None, None, :]
        blocks = self.table[layers, heads, block_index].astype(np.int64)
        return blocks * self.block_size + logical % self.block_size


def replace_ids(table: np.ndarray, sources: np.ndarray, copies: np.ndarray) -> None:
    """In place on a contiguous table: every id of ``sources`` becomes its
    copy (ids are unique within a request, so this is a per-id map)."""
    flat = table.reshape(-1)
    if not np.shares_memory(flat, table):
        raise ValueError("replace_ids needs a contiguous table")
    hit = np.isin(flat, sources)
    order = np.argsort(sources)
    flat[hit] = copies[order][np.searchsorted(sources[order], flat[hit])]
