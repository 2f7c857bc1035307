"""The CUDA path's start-up pieces, checked on CPU: what the engine arguments
become on CUDA, the backend's declared limits as vLLM's own
``validate_configuration`` reads them, and that the GPU runner and worker
override hooks vLLM's GPU classes really have. No GPU runs here: the platform
is a stand-in object, and the backend class itself is run in the CPU engine by
``test_engine_ops.py``."""

import inspect

import pytest
import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms.interface import DeviceCapability
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

import vllm.platforms
from vllm_kvcompress import engine_args
from vllm_kvcompress.attention.cuda_backend import HeadPagedCudaBackend
from vllm_kvcompress.engine_args import CUDA_OPT_IN, UnsupportedSetupError
from vllm_kvcompress.worker.cuda import KVCompressGPUModelRunner, KVCompressGPUWorker
from vllm_kvcompress.worker.runner import HeadPagedRunnerMixin


class StandInPlatform:
    """Answers the three questions ``platform_setup`` asks of vLLM's platform."""

    def __init__(self, name: str):
        self.device_name = name

    def is_cpu(self) -> bool:
        return self.device_name == "cpu"

    def is_cuda(self) -> bool:
        return self.device_name == "cuda"


def apply_on(platform: str, monkeypatch, **kwargs) -> EngineArgs:
    monkeypatch.setattr(vllm.platforms, "current_platform", StandInPlatform(platform))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    args = EngineArgs(model="unused", additional_config={"kv_compress_rate": 8}, **kwargs)
    engine_args.apply_engine_args(args)
    return args


def test_cuda_needs_the_opt_in(monkeypatch):
    monkeypatch.delenv(CUDA_OPT_IN, raising=False)
    with pytest.raises(UnsupportedSetupError, match=f"{CUDA_OPT_IN}=1"):
        apply_on("cuda", monkeypatch)


def test_cuda_setup_when_opted_in(monkeypatch):
    monkeypatch.setenv(CUDA_OPT_IN, "1")
    args = apply_on("cuda", monkeypatch)
    assert args.worker_cls.endswith("KVCompressGPUWorker")
    assert args.attention_backend == "CUSTOM"
    assert args.block_size == 16
    assert args.async_scheduling is False
    assert args.scheduler_cls.endswith("KVCompressScheduler")


@pytest.mark.parametrize("kwargs, flag", [
    (dict(block_size=24), "--block-size 24 on CUDA"),
    (dict(attention_backend="FLASH_ATTN"), "--attention-backend FLASH_ATTN"),
])
def test_cuda_refuses_what_the_backend_cannot_take(monkeypatch, kwargs, flag):
    monkeypatch.setenv(CUDA_OPT_IN, "1")
    with pytest.raises(UnsupportedSetupError, match=flag):
        apply_on("cuda", monkeypatch, **kwargs)


def test_other_platforms_are_refused(monkeypatch):
    monkeypatch.setenv(CUDA_OPT_IN, "1")
    with pytest.raises(UnsupportedSetupError, match="'tpu' platform"):
        apply_on("tpu", monkeypatch)


VALID = dict(use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
             use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
             attn_type="decoder")


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_backend_accepts_what_its_kernels_serve(head_size, dtype, block_size):
    assert HeadPagedCudaBackend.validate_configuration(
        head_size, dtype, "auto", block_size, **VALID) == []


@pytest.mark.parametrize("change, reason", [
    (dict(head_size=100), "head_size not supported"),
    (dict(head_size=512), "head_size not supported"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype not supported"),
    (dict(block_size=8), "block_size not supported"),
    (dict(use_mla=True), "MLA not supported"),
    (dict(has_sink=True), "attention sinks not supported"),
    (dict(has_sliding_window=True), "sliding window not supported"),
    (dict(attn_type="encoder_only"), "attention type encoder_only not supported"),
])
def test_backend_refuses_the_rest(change, reason):
    config = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto",
                  block_size=16, **VALID)
    config.update(change)
    assert reason in HeadPagedCudaBackend.validate_configuration(**config)


def parameter_names(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("hook", sorted(
    name for name, value in vars(HeadPagedRunnerMixin).items()
    if callable(value) and hasattr(GPUModelRunner, name)))
def test_runner_hooks_exist_in_vllms_gpu_runner(hook):
    """Every vLLM method the mixin overrides is one of the GPU runner's, and
    takes what vLLM passes it (named the same, or absorbed by *args)."""
    ours = inspect.signature(getattr(HeadPagedRunnerMixin, hook)).parameters
    takes_rest = any(p.kind is p.VAR_POSITIONAL for p in ours.values())
    for name in parameter_names(getattr(GPUModelRunner, hook)):
        assert name in ours or takes_rest, f"{hook} drops vLLM's {name!r}"
    assert getattr(KVCompressGPUModelRunner, hook) is getattr(HeadPagedRunnerMixin, hook)


def test_runner_overrides_the_hooks_it_was_written_for():
    """If vLLM renamed one of these hooks, ours would silently never run and
    this set would shrink."""
    vllm_hooks = {"__init__", "initialize_kv_cache", "execute_model", "_update_states",
                  "sample_tokens", "_get_slot_mappings"}
    overrides = {name for name, value in vars(HeadPagedRunnerMixin).items()
                 if callable(value) and hasattr(GPUModelRunner, name)}
    assert overrides == vllm_hooks


def test_worker_builds_its_runner_where_vllm_does():
    assert "_make_model_runner" in vars(Worker)
    assert "_make_model_runner" in vars(KVCompressGPUWorker)
    assert KVCompressGPUModelRunner.__mro__[1:3] == (HeadPagedRunnerMixin, GPUModelRunner)


@pytest.mark.parametrize("feature, reason", [
    (dict(sliding_window=64), "sliding-window"),
    (dict(kv_sharing_target_layer_name="model.layers.0.self_attn.attn"), "share another"),
    (dict(logits_soft_cap=30.0), "soft-capping"),
    (dict(alibi_slopes=[0.5] * 8), "ALiBi"),
])
def test_cuda_impl_refuses_layers_it_cannot_serve(monkeypatch, feature, reason):
    from vllm_kvcompress.attention.cuda_backend import HeadPagedCudaImpl

    monkeypatch.setenv("VLLM_KVCOMPRESS_OPS", "torch")
    HeadPagedCudaImpl(8, 64, 0.125, 2)  # a plain GQA layer is served
    with pytest.raises(NotImplementedError, match=reason):
        HeadPagedCudaImpl(8, 64, 0.125, 2, **feature)


def test_cuda_impl_refuses_the_cpu_kernels(monkeypatch):
    from vllm_kvcompress.attention.cuda_backend import HeadPagedCudaImpl

    monkeypatch.setenv("VLLM_KVCOMPRESS_OPS", "cpu")
    with pytest.raises(ValueError, match="VLLM_KVCOMPRESS_OPS=cpu"):
        HeadPagedCudaImpl(8, 64, 0.125, 2)
