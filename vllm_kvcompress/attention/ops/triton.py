"""The ops interface over the Triton kernels of ``kernels/`` (import name
``vllm_kvcompress_kernels``): the CUDA path's kernels, run on the same pool
the engine uses. On CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1``, set before anything imports the kernels).

Layout: K and V row-major in the two halves of each head-block (the torch
oracle's layout), seen by the kernels as ``[P, block_size, D]`` strided views.
"""

from __future__ import annotations

import torch

from ..metadata import HeadPagedMetadata
from ..pool_view import HeadBlockCache


def _kernels():
    import vllm_kvcompress_kernels

    return vllm_kvcompress_kernels


def pool_views(pool: HeadBlockCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches ``[P, block_size, D]`` as the kernels take them."""
    key_cache, value_cache = pool.key_value()
    return key_cache[:, 0], value_cache[:, 0]


class TritonOps:
    name = "triton"

    def write_cache(self, pool: HeadBlockCache, key, value, slot_mapping, **_) -> None:
        t = key.shape[0]
        _kernels().write_kv_cache(key, value, slot_mapping[:t], *pool_views(pool))

    def attend(self, pool: HeadBlockCache, meta: HeadPagedMetadata, layer: int,
               query, output, scale: float, **_) -> None:
        t = meta.num_actual_tokens
        seq_lens = meta.seq_lens[layer]
        _kernels().paged_attention(
            query[:t], *pool_views(pool), meta.block_tables[layer], seq_lens,
            meta.request_query_start_loc, scale, out=output[:t],
            max_seq_len=meta.max_seq_len(layer), max_query_len=meta.max_query_len)

    def window_statistics(self, pool: HeadBlockCache, queries, query_positions,
                          block_tables, seq_lens, kv_position, scale: float, width: int,
                          entropy_before=None):
        """The statistics kernel over keys read in place in the pool: per
        logical KV of every row, the window's probabilities summed (and
        squared and summed) over its queries and the group's query heads,
        and each row's entropy (``AttentionStats``)."""
        return _kernels().attention_stats(
            queries, query_positions, pool_views(pool)[0], block_tables, seq_lens,
            kv_position, scale, max_len=width, entropy_before=entropy_before)

    def reconstruction_attention(self, query, key, value, held_keys, held_values,
                                 held_lens, scale: float):
        """kvzip's pass with the Triton kernels: output and scores without a
        probability matrix in memory."""
        return _kernels().reconstruction_attention(
            query, key, value, held_keys, held_values, held_lens, scale)

    def key_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> str:
        return "row_major"

    def move_slots(self, pool: HeadBlockCache, moves: torch.Tensor,
                   kv_metric: torch.Tensor | None = None,
                   kv_position: torch.Tensor | None = None,
                   layout: str = "row_major") -> None:
        if layout != "row_major":
            raise ValueError(f"the Triton ops keep K row-major; asked for {layout!r}")
        _kernels().compact_kv(moves, *pool_views(pool), kv_metric, kv_position)
