"""Per-head paged attention with vLLM's C++ CPU kernels.

The kernels are given the pool as a cache with ONE KV head, the query heads
of one GQA group as that sequence's heads, and one block-table row and length
per (request, KV head). This was checked exact against ``ops.torch_ref``.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm import envs

from ...compression.reconstruction import reconstruction_attention
from ..metadata import HeadPagedMetadata
from ..pool_view import HeadBlockCache
from .moves import apply_moves


def write_cache(
    pool: HeadBlockCache,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
    kv_cache_dtype: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store ``key``/``value`` [T, H, D] at per-head slots [T, H] (-1 skips)."""
    key_cache, value_cache = pool.key_value()
    t, h, d = key.shape
    ops.cpu_attn_reshape_and_cache(
        key.reshape(t * h, 1, d),
        value.reshape(t * h, 1, d),
        key_cache,
        value_cache,
        slot_mapping[:t].reshape(t * h),
        isa,
        k_scale=k_scale,
        v_scale=v_scale,
        kv_cache_dtype=kv_cache_dtype,
    )


def _work_split(meta: HeadPagedMetadata, layer: int, group_size: int,
                head_dim: int, dtype: torch.dtype, isa: str,
                kv_cache_dtype: str) -> torch.Tensor:
    """The C++ kernel's scheduler metadata; reused across equal-length layers."""
    seq_lens = meta.seq_lens[layer]
    previous = meta.layer_cache.get("split")
    if previous is not None and torch.equal(previous[0], seq_lens):
        return previous[1]
    split = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0],
        num_heads=group_size,
        num_kv_heads=1,
        head_dim=head_dim,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=meta.query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=kv_cache_dtype,
    )
    meta.layer_cache["split"] = (seq_lens, split)
    return split


def attend(
    pool: HeadBlockCache,
    meta: HeadPagedMetadata,
    layer: int,
    query: torch.Tensor,
    output: torch.Tensor,
    scale: float,
    isa: str,
    kv_cache_dtype: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Causal attention of ``query`` [T, H*G, D] over each head's own KVs."""
    key_cache, value_cache = pool.key_value()
    q = meta.to_head_major(query)
    heads_out = torch.empty_like(q)
    split = _work_split(meta, layer, q.shape[1], q.shape[2], q.dtype, isa,
                        kv_cache_dtype)
    ops.cpu_attention_with_kv_cache(
        query=q,
        key_cache=key_cache,
        value_cache=value_cache,
        output=heads_out,
        query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens[layer],
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=meta.block_tables[layer],
        softcap=0.0,
        scheduler_metadata=split,
        s_aux=None,
        k_scale=k_scale,
        v_scale=v_scale,
        kv_cache_dtype=kv_cache_dtype,
    )
    meta.store_token_major(output, heads_out)


def key_layout(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> str:
    """Where vLLM's cache-write kernel puts K and V inside a head-block.

    Writes one block of distinct values through the kernel into a scratch
    pool and matches it against the layouts ``moves.apply_moves`` understands.
    """
    pool = HeadBlockCache.empty(1, block_size, head_dim, dtype)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(block_size, head_dim, generator=gen).to(dtype)
    value = torch.randn(block_size, head_dim, generator=gen).to(dtype)
    slots = torch.arange(block_size, dtype=torch.int64)[:, None]
    write_cache(pool, key[:, None], value[:, None], slots, isa)
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


class CpuOps:
    """The ops interface over vLLM's C++ CPU kernels for one ISA."""

    name = "cpu"

    def __init__(self, isa: str):
        self.isa = isa

    def write_cache(self, pool: HeadBlockCache, key, value, slot_mapping, **quant) -> None:
        write_cache(pool, key, value, slot_mapping, self.isa, **quant)

    def attend(self, pool: HeadBlockCache, meta: HeadPagedMetadata, layer: int,
               query, output, scale: float, **quant) -> None:
        attend(pool, meta, layer, query, output, scale, self.isa, **quant)

    def key_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> str:
        return key_layout(self.isa, block_size, head_dim, dtype)

    move_slots = staticmethod(apply_moves)
    # kvzip's pass: torch, tiled (compression/reconstruction.py).
    reconstruction_attention = staticmethod(reconstruction_attention)
