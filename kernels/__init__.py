"""Triton kernels of vllm_kvcompress, each with a plain-torch reference of the same signature.

Import name: ``vllm_kvcompress_kernels``.  Importing never needs CUDA or Triton;
the Triton wrappers raise ``RuntimeError`` when Triton is missing (or when given
CPU tensors outside ``TRITON_INTERPRET=1``).  See ``docs/kernels.md``.

Layout (shared with the engine): a pool of head-blocks, ``key_cache`` /
``value_cache [P, block_size, D]``, ``kv_metric [P, block_size]`` float32,
``kv_position [P, block_size]`` int32; per (request, KV head) rows ``r*H+h`` of
``block_tables [N_rows, max_blocks]`` int32 and ``seq_lens [N_rows]`` int32.
"""

from ._triton_guard import HAS_TRITON, interpret_mode
from .attention_stats import AttentionStats, attention_stats, attention_stats_ref
from .cache_write import write_kv_cache, write_kv_cache_ref
from .compaction import compact_kv, compact_kv_ref
from .paged_attention import paged_attention, paged_attention_ref
from .reconstruction import reconstruction_attention, reconstruction_attention_ref

__all__ = [
    "HAS_TRITON",
    "interpret_mode",
    "AttentionStats",
    "attention_stats",
    "attention_stats_ref",
    "paged_attention",
    "paged_attention_ref",
    "compact_kv",
    "compact_kv_ref",
    "write_kv_cache",
    "write_kv_cache_ref",
    "reconstruction_attention",
    "reconstruction_attention_ref",
]
