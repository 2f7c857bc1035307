"""The engines the GPU harness starts: stock vLLM and the plugin on the same
model and settings, in one of three modes tried in order.

- ``compiled``: vLLM's default on CUDA (Inductor, CUDA graphs
  FULL_AND_PIECEWISE; the plugin's attention builder makes it PIECEWISE);
- ``compiled-no-aot``: the same with ``VLLM_USE_AOT_COMPILE=0``, for a torch
  (the machine has 2.11, vLLM pins 2.13) whose AOT compile path breaks;
- ``eager``: no compile, no graphs, and vLLM's native custom ops, so no call
  reaches a compiled kernel the machine lacks.

Shared settings and why: block size 16 (the plugin's CUDA head-block size;
TRITON_ATTN's default too), no prefix caching (random prompts share nothing;
one variable less on an unverified path), one fixed KV pool for every engine
(``num_gpu_blocks_override``) so stock is KV-bound, and at most 256 running
requests (vLLM's default on smaller GPUs; on an H200 it would be 1024, and
every extra CUDA-graph batch size captured costs start-up time, which counts
against the device call; the KV-bound workload stays below 256). The plugin
adds its own settings (``CUSTOM`` backend, V1 runner, synchronous
scheduling); stock keeps vLLM's defaults otherwise. The plugin's attention runs in its Triton ops: the
machine has no compiled FlashAttention.
"""

from __future__ import annotations

from pathlib import Path

MODES = ("compiled", "compiled-no-aot", "eager")
MODE_ENV = {"compiled": {}, "compiled-no-aot": {"VLLM_USE_AOT_COMPILE": "0"}, "eager": {}}
EAGER_ARGS = {
    "enforce_eager": True,
    "compilation_config": {"custom_ops": ["none"]},
    "ir_op_priority": {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]},
}
PLUGIN_ENV = {"VLLM_KVCOMPRESS_UNVERIFIED_CUDA": "1", "VLLM_KVCOMPRESS_OPS": "triton"}
BLOCK_SIZE = 16
MAX_NUM_SEQS = 256


def common_args(model: Path, mode: str, *, dtype: str = "bfloat16",
                max_model_len: int = 6528, num_blocks: int | None = None,
                gpu_memory_utilization: float = 0.9) -> dict:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    args = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True,
                dtype=dtype, max_model_len=max_model_len, block_size=BLOCK_SIZE,
                enable_prefix_caching=False, seed=0, max_num_seqs=MAX_NUM_SEQS,
                gpu_memory_utilization=gpu_memory_utilization)
    if num_blocks is not None:
        args["num_gpu_blocks_override"] = num_blocks
    if mode == "eager":
        args.update(EAGER_ARGS)
    return args


def stock_args(model: Path, mode: str, **kwargs) -> dict:
    return {**common_args(model, mode, **kwargs), "attention_backend": "TRITON_ATTN"}


def plugin_args(model: Path, mode: str, rate: float = 1, **kwargs) -> dict:
    """The plugin at engine-wide ``rate``; workloads set other rates and
    policies per request (``SamplingParams.extra_args``)."""
    return {**common_args(model, mode, **kwargs), "kv_compress_rate": rate}


def env_for(kind: str, mode: str) -> dict[str, str]:
    return {**MODE_ENV[mode], **(PLUGIN_ENV if kind == "plugin" else {})}
