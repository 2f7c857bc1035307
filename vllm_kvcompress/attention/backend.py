"""The attention backend registered in place of vLLM's CPU_ATTN when
compression is on: cache writes and attention go to each KV head's own blocks.

The metadata comes from ``builder.HeadPagedMetadataBuilder``; the layer's
work from ``forward.HeadPagedForward`` with an ops implementation (``ops/``).
Stock vLLM's CPU backend is reused for everything that does not touch the
cache layout (head sizes, dtypes, layouts). Attention and the cache write
stay vLLM's splitting ops, so the rest of the model runs compiled.
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    _get_attn_isa,
)

from .builder import HeadPagedMetadataBuilder
from .forward import HeadPagedForward
from .ops import make_ops

BACKEND_PATH = "vllm_kvcompress.attention.backend.HeadPagedBackend"


class HeadPagedImpl(HeadPagedForward, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refuse_unsupported()
        config = get_current_vllm_config()
        self.isa = _get_attn_isa(
            config.model_config.dtype, config.cache_config.block_size,
            self.head_size, self.kv_cache_dtype)
        self.ops = make_ops("cpu", self.isa)


class HeadPagedBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return HeadPagedImpl

    @staticmethod
    def get_builder_cls():
        return HeadPagedMetadataBuilder
