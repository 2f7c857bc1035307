"""The attention backend registered as vLLM's ``CUSTOM`` on CUDA when
compression is on. Written and checked on CPU only: no GPU with vLLM's CUDA
build has run it (docs/gpu.md).

It declares what the per-head cache and its kernels accept, so vLLM's own
``validate_configuration`` refuses anything else at start-up: one layout
(``LBHNC``: each (layer, block, KV head) is one contiguous head-block of K then
V, the pool ``HeadBlockCache`` views), block sizes that are multiples of 16
(FlashAttention's paged minimum), head sizes FlashAttention serves, and
unquantized caches. The layer's work is ``HeadPagedForward`` with the
FlashAttention ops by default.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend, AttentionImpl, AttentionType, MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from ..engine_args import CUDA_SETUP
from .builder import HeadPagedMetadataBuilder
from .forward import HeadPagedForward
from .ops import make_ops

CUDA_BACKEND_PATH = "vllm_kvcompress.attention.cuda_backend.HeadPagedCudaBackend"
MAX_HEAD_SIZE = 256


class HeadPagedCudaImpl(HeadPagedForward, AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.alibi_slopes = alibi_slopes
        self.sinks = sinks
        self.logits_soft_cap = logits_soft_cap or 0
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.refuse_unsupported()
        if sliding_window is not None:
            raise NotImplementedError(
                "KV compression does not support sliding-window attention")
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError(
                "KV compression does not support layers that share another "
                "layer's KV cache")
        self.ops = make_ops("flash")


class HeadPagedCudaBackend(AttentionBackend):
    forward_includes_kv_cache_update = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return HeadPagedCudaImpl

    @staticmethod
    def get_builder_cls():
        return HeadPagedMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(CUDA_SETUP.block_multiple)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and 0 < head_size <= MAX_HEAD_SIZE

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)
