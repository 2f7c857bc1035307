"""The attention backend registered in place of vLLM's CPU_ATTN when
compression is on: cache writes and attention go to each KV head's own blocks.

The metadata is built by the model runner (it owns the per-head tables); the
builder only hands it over. Stock vLLM's CPU backend is reused for everything
that does not touch the cache layout (head sizes, dtypes, layouts).
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionMetadataBuilder
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    _get_attn_isa,
)

from . import cpu_paged
from .metadata import HeadPagedMetadata, current

BACKEND_PATH = "vllm_kvcompress.attention.backend.HeadPagedBackend"


class HeadPagedMetadataBuilder(AttentionMetadataBuilder[HeadPagedMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = current()
        if metadata is None:
            raise RuntimeError(
                "per-head attention metadata missing: the model runner did not "
                "prepare this step (is the vllm_kvcompress worker in use?)"
            )
        return metadata


class HeadPagedImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.alibi_slopes is not None or self.sinks is not None:
            raise NotImplementedError(
                "KV compression does not support ALiBi or attention-sink models"
            )
        if self.logits_soft_cap:
            raise NotImplementedError(
                "KV compression does not support attention logit soft-capping"
            )
        config = get_current_vllm_config()
        self.isa = _get_attn_isa(
            config.model_config.dtype,
            config.cache_config.block_size,
            self.head_size,
            self.kv_cache_dtype,
        )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        metadata = current()
        if metadata is None:  # profiling / warm-up run: nothing to keep
            return
        cpu_paged.write_cache(
            metadata.pool, key, value, slot_mapping, self.isa,
            kv_cache_dtype=self.kv_cache_dtype,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
        )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        layer_index = attn_metadata.layer_index[layer.layer_name]
        if attn_metadata.capture_rows is not None:
            attn_metadata.captured[layer_index] = query[attn_metadata.capture_rows]
        cpu_paged.attend(
            attn_metadata.pool, attn_metadata, layer_index,
            query, output.view(output.shape[0], self.num_heads, self.head_size),
            self.scale, self.isa, kv_cache_dtype=self.kv_cache_dtype,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
        )
        return output


class HeadPagedBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return HeadPagedImpl

    @staticmethod
    def get_builder_cls():
        return HeadPagedMetadataBuilder
