"""Turns the worker's per-head tables into one step's tensors: per-layer slot
mappings ``[T, H]`` for the cache write and the per-head attention metadata.
"""

from __future__ import annotations

import numpy as np
import torch

from .attention.metadata import HeadPagedMetadata
from .attention.pool import HeadBlockCache
from .head_table import HeadTable


def head_major_rows(num_tokens: list[int], num_kv_heads: int) -> np.ndarray:
    """For rows ordered (request, head, token): the row in the token-major
    ``[T * H]`` view, i.e. ``(start_r + j) * H + h``."""
    starts = np.cumsum([0] + num_tokens[:-1])
    parts = [
        ((start + np.arange(n))[None, :] * num_kv_heads
         + np.arange(num_kv_heads)[:, None]).reshape(-1)
        for start, n in zip(starts, num_tokens)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def build_step(
    tables: list[HeadTable],
    num_tokens: list[int],
    num_tokens_padded: int,
    pool: HeadBlockCache,
    layer_index: dict[str, int],
) -> tuple[HeadPagedMetadata, torch.Tensor]:
    """Metadata and slots ``[L, num_tokens_padded, H]`` for one forward step.

    ``tables[i]`` gets ``num_tokens[i]`` new tokens; their lengths are advanced
    here, so call this exactly once per executed step.
    """
    num_layers, num_heads = tables[0].shape
    total = sum(num_tokens)
    slots = np.full((num_layers, num_tokens_padded, num_heads), -1, dtype=np.int64)
    offset = 0
    for table, n in zip(tables, num_tokens):
        slots[:, offset : offset + n] = table.new_token_slots(n)
        table.lens += n
        offset += n

    max_blocks = max(int(t.nblocks.max()) for t in tables)
    block_tables = np.zeros(
        (num_layers, len(tables), num_heads, max(max_blocks, 1)), dtype=np.int32
    )
    for i, table in enumerate(tables):
        width = min(max_blocks, table.table.shape[2])
        block_tables[:, i, :, :width] = table.table[:, :, :width]
    seq_lens = np.stack([t.lens for t in tables], axis=1).astype(np.int32)

    per_row_queries = np.repeat(np.asarray(num_tokens, dtype=np.int32), num_heads)
    query_start_loc = np.zeros(len(per_row_queries) + 1, dtype=np.int32)
    np.cumsum(per_row_queries, out=query_start_loc[1:])
    rows = None
    if max(num_tokens) > 1:
        rows = torch.from_numpy(head_major_rows(num_tokens, num_heads))

    metadata = HeadPagedMetadata(
        pool=pool,
        num_actual_tokens=total,
        num_kv_heads=num_heads,
        block_tables=torch.from_numpy(
            block_tables.reshape(num_layers, len(tables) * num_heads, -1)
        ),
        seq_lens=torch.from_numpy(seq_lens.reshape(num_layers, -1)),
        query_start_loc=torch.from_numpy(query_start_loc),
        head_major_rows=rows,
        layer_index=layer_index,
    )
    return metadata, torch.from_numpy(slots)
