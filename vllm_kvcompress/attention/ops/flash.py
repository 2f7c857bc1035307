"""Attention through FlashAttention's varlen paged API in the one-head-sequence
view: each (request, KV head) is one sequence with one KV head and the G query
heads of its group, its own block-table row and its own length
(``seqused_k``). The CUDA path's attention; cache writes and compaction stay
the Triton kernels' (same row-major pool layout).

``varlen`` is ``vllm.vllm_flash_attn.flash_attn_varlen_func`` on CUDA. On CPU,
where vLLM's compiled FlashAttention cannot run, ``flash_reference`` stands in
for it with the same contract, so the engine tests exercise the view itself.
"""

from __future__ import annotations

import torch

from ..metadata import HeadPagedMetadata
from ..pool_view import HeadBlockCache
from .triton import TritonOps


def flash_pool_views(pool: HeadBlockCache) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as FlashAttention's paged caches ``[P, block_size, 1, D]``:
    one KV head per page, the halves of each head-block."""
    key_cache, value_cache = pool.key_value()  # [P, 1, bs, D] each
    return key_cache.transpose(1, 2), value_cache.transpose(1, 2)


def load_flash_attention():
    """vLLM's FlashAttention varlen function; a clear error where the CUDA
    build of vLLM is missing, never a silent fallback."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError(
            "the 'flash' attention ops need the CUDA build of vLLM with its "
            f"FlashAttention extension ({e}); use VLLM_KVCOMPRESS_OPS=triton "
            "instead") from e
    return flash_attn_varlen_func


def flash_version(head_size: int, block_size: int) -> int:
    """FA3 where vLLM would pick it (Hopper), else FA2."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    picked = get_flash_attn_version(head_size=head_size, kv_cache_block_size=block_size)
    if picked is None:
        raise RuntimeError(
            "vLLM reports no usable FlashAttention on this device; use "
            "VLLM_KVCOMPRESS_OPS=triton instead")
    return 3 if picked == 3 else 2


class FlashOps(TritonOps):
    """Attention by FlashAttention, everything else by the Triton kernels.

    ``varlen=None`` loads vLLM's FlashAttention and asks vLLM which version
    suits the device; a stand-in ``varlen`` (``flash_reference``) gets no
    version argument."""

    name = "flash"

    def __init__(self, varlen=None):
        self.native = varlen is None
        self.varlen = load_flash_attention() if self.native else varlen
        self.fa_version: int | None = None

    def attend(self, pool: HeadBlockCache, meta: HeadPagedMetadata, layer: int,
               query, output, scale: float, **_) -> None:
        if meta.num_actual_tokens == 0:
            return
        if self.native and self.fa_version is None:
            self.fa_version = flash_version(pool.head_dim, pool.block_size)
        q = meta.to_head_major(query)  # [sum of chunks, G, D], (request, head)-major
        heads_out = torch.empty_like(q)
        key_cache, value_cache = flash_pool_views(pool)
        seq_lens = meta.seq_lens[layer]
        version = {} if self.fa_version is None else {"fa_version": self.fa_version}
        self.varlen(
            q=q, k=key_cache, v=value_cache,
            max_seqlen_q=meta.max_query_len, cu_seqlens_q=meta.query_start_loc,
            max_seqlen_k=meta.max_seq_len(layer), seqused_k=seq_lens,
            block_table=meta.block_tables[layer], softmax_scale=scale, causal=True,
            out=heads_out, scheduler_metadata=None, **version)
        meta.store_token_major(output, heads_out)
