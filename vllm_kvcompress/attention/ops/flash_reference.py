"""FlashAttention's varlen paged contract in plain torch: the stand-in for
``vllm.vllm_flash_attn.flash_attn_varlen_func`` where vLLM's compiled
FlashAttention cannot run (the CPU engine's tests of the CUDA path's
one-head-sequence view, ``VLLM_KVCOMPRESS_OPS=flash-reference``).

Only the arguments that view passes are honoured; anything else is refused
rather than ignored. The contract, as read in FlashAttention's sources:
sequence i has the queries ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` and the
first ``seqused_k[i]`` KVs of the pages ``block_table[i]``; causal masking is
aligned bottom-right; query head j reads KV head ``j // (Hq / Hk)``.
"""

from __future__ import annotations

import torch

from .torch_ref import causal_attention


def flash_reference(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k=None,
                    softmax_scale=None, causal=False, block_table=None, out=None,
                    scheduler_metadata=None, fa_version=None, **unsupported):
    """q [Tq, Hq, D]; k, v [pages, page_size, Hk, D]; block_table [S, MB]
    int32; seqused_k [S] int32; cu_seqlens_q [S + 1] int32. Writes ``out``
    (or a new tensor) [Tq, Hq, D] and returns it."""
    if unsupported:
        raise TypeError(f"flash_reference does not model {sorted(unsupported)}")
    if block_table is None or seqused_k is None or not causal:
        raise TypeError("flash_reference models the paged causal call only")
    if block_table.dtype != torch.int32 or seqused_k.dtype != torch.int32:
        raise TypeError("block_table and seqused_k must be int32, as FlashAttention needs")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q) if out is None else out
    num_kv_heads = k.shape[2]
    group = q.shape[1] // num_kv_heads
    starts = cu_seqlens_q.tolist()
    lengths = seqused_k.tolist()
    if max(lengths, default=0) > max_seqlen_k or max(
            (b - a for a, b in zip(starts, starts[1:])), default=0) > max_seqlen_q:
        raise ValueError("a sequence is longer than max_seqlen_q / max_seqlen_k")
    page = k.shape[1]
    for i, length in enumerate(lengths):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        pages = block_table[i, : -(-length // page)].long()
        for h in range(num_kv_heads):
            keys = k[pages, :, h].reshape(-1, k.shape[-1])[:length]
            values = v[pages, :, h].reshape(-1, v.shape[-1])[:length]
            heads = slice(h * group, (h + 1) * group)
            out[lo:hi, heads] = causal_attention(q[lo:hi, heads], keys, values,
                                                 scale).to(out.dtype)
    return out
