"""CUDA model runner and worker for compression: the per-head mixin over
vLLM's V1 ``GPUModelRunner``, built through ``Worker._make_model_runner``, and
the per-head backend registered as ``CUSTOM``. Chosen through ``--worker-cls``
by the plugin when ``VLLM_KVCOMPRESS_UNVERIFIED_CUDA=1``.

Written and checked on CPU only (the hooks it overrides exist in vLLM's
GPU runner with the same signatures): no GPU with vLLM's CUDA build has run
it. See docs/gpu.md.
"""

from __future__ import annotations

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from ..attention.cuda_backend import CUDA_BACKEND_PATH
from .runner import HeadPagedRunnerMixin, refuse_v2_runner


class KVCompressGPUModelRunner(HeadPagedRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU runner with per-head tables and compression."""


class KVCompressGPUWorker(Worker):
    def __init__(self, *args, **kwargs):
        # The plugin selects attention_backend="CUSTOM"; this is ours.
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND_PATH)
        super().__init__(*args, **kwargs)

    def _make_model_runner(self) -> KVCompressGPUModelRunner:
        refuse_v2_runner(self.use_v2_model_runner)
        return KVCompressGPUModelRunner(self.vllm_config, self.device)
