"""CPU model runner and worker for compression: the per-head mixin over
vLLM's ``CPUModelRunner``; the worker registers the per-head attention
backend and builds that runner. Chosen through ``--worker-cls`` by the plugin."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from ..attention.backend import BACKEND_PATH
from .runner import HeadPagedRunnerMixin, refuse_v2_runner


class KVCompressCPUModelRunner(HeadPagedRunnerMixin, CPUModelRunner):
    """vLLM's CPU runner with per-head tables and compression."""


class KVCompressCPUWorker(CPUWorker):
    def __init__(self, *args, **kwargs):
        # vLLM's CPU platform always picks CPU_ATTN; point that name at ours.
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
        super().__init__(*args, **kwargs)

    def init_device(self) -> None:
        super().init_device()
        refuse_v2_runner(self.use_v2_model_runner)
        # CPUWorker builds its runner inline; replace it before the model loads.
        self.model_runner = KVCompressCPUModelRunner(self.vllm_config, torch.device("cpu"))
