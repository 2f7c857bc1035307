"""The attention backend registered in place of vLLM's CPU_ATTN when
compression is on: cache writes and attention go to each KV head's own blocks.

The metadata comes from ``builder.HeadPagedMetadataBuilder``; the kernels
from an ops implementation (``ops/``). Stock vLLM's CPU backend is reused for
everything that does not touch the cache layout (head sizes, dtypes,
layouts). Attention and the cache write stay vLLM's splitting ops, so the
rest of the model runs compiled.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    _get_attn_isa,
)

from ..compression.reconstruction import ReconstructionMetadata
from .builder import HeadPagedMetadataBuilder
from .ops import make_ops
from .pool_view import HeadBlockCache

BACKEND_PATH = "vllm_kvcompress.attention.backend.HeadPagedBackend"


class HeadPagedImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.alibi_slopes is not None or self.sinks is not None:
            raise NotImplementedError(
                "KV compression does not support ALiBi or attention-sink models")
        if self.logits_soft_cap:
            raise NotImplementedError(
                "KV compression does not support attention logit soft-capping")
        config = get_current_vllm_config()
        self.isa = _get_attn_isa(
            config.model_config.dtype, config.cache_config.block_size,
            self.head_size, self.kv_cache_dtype)
        self.ops = make_ops(self.isa)
        self.pool: HeadBlockCache | None = None

    def bind_pool(self, pool: HeadBlockCache) -> None:
        """The runner hands every layer the head-block pool view."""
        self.pool = pool

    def _quant(self, layer) -> dict:
        return dict(kv_cache_dtype=self.kv_cache_dtype,
                    k_scale=layer._k_scale_float, v_scale=layer._v_scale_float)

    def _bound_pool(self) -> HeadBlockCache:
        if self.pool is None:
            raise RuntimeError(
                "per-head attention ran before the model runner bound the "
                "head-block pool (is the vllm_kvcompress worker in use?)")
        return self.pool

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # Profiling and warm-up runs send all -1 slots: nothing is written.
        self.ops.write_cache(self._bound_pool(), key, value, slot_mapping,
                             **self._quant(layer))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up / compile run
            return output.fill_(0)
        if isinstance(attn_metadata, ReconstructionMetadata):  # kvzip scoring
            attn_metadata.attend(layer.layer_name, query, key, value, output)
            return output
        layer_index = attn_metadata.layer_index[layer.layer_name]
        if attn_metadata.capture is not None:
            attn_metadata.capture.take(layer_index, query)
        self.ops.attend(
            attn_metadata.pool, attn_metadata, layer_index, query,
            output.view(output.shape[0], self.num_heads, self.head_size),
            self.scale, **self._quant(layer))
        return output


class HeadPagedBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return HeadPagedImpl

    @staticmethod
    def get_builder_cls():
        return HeadPagedMetadataBuilder
