"""The per-head attention layer's work, shared by the CPU and CUDA backends:
refuse what the head-block cache cannot hold, write new K/V to each KV
head's own blocks, and attend through the ops over the pool. The platform
backends differ only in the vLLM base class and which ops they pick.
"""

from __future__ import annotations

import torch

from ..compression.reconstruction import ReconstructionMetadata
from .pool_view import HeadBlockCache


class HeadPagedForward:
    """Mixed in front of a vLLM ``AttentionImpl``; needs ``self.ops``."""

    pool: HeadBlockCache | None = None

    def refuse_unsupported(self) -> None:
        """Features of the layer that per-head eviction cannot serve."""
        if self.alibi_slopes is not None or self.sinks is not None:
            raise NotImplementedError(
                "KV compression does not support ALiBi or attention-sink models")
        if self.logits_soft_cap:
            raise NotImplementedError(
                "KV compression does not support attention logit soft-capping")

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
        if attn_metadata is None:  # profiling / warm-up / compile / graph capture
            return output.fill_(0)
        if isinstance(attn_metadata, ReconstructionMetadata):  # kvzip scoring
            attn_metadata.attend(layer.layer_name, query, key, value, output,
                                 self.ops.reconstruction_attention)
            return output
        layer_index = attn_metadata.layer_index[layer.layer_name]
        if attn_metadata.capture is not None:
            attn_metadata.capture.take(layer_index, query)
        self.ops.attend(
            attn_metadata.pool, attn_metadata, layer_index, query,
            output.view(output.shape[0], self.num_heads, self.head_size),
            self.scale, **self._quant(layer))
        return output
