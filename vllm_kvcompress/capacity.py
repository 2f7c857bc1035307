"""vLLM's start-up capacity check, as it reads with cascading compression.

Stock vLLM refuses to start unless one request of ``max_model_len`` tokens
fits the KV cache uncompressed. With ``--kv-compress-cascade`` a request
never holds more than its compressed budget plus one prompt chunk, so the
check asks for that instead; prompts longer than the whole pool can then be
served. Installed in every process by ``register()``; without cascading the
stock check runs unchanged.
"""

from __future__ import annotations

import functools
import math

from .compression.budget import peak_tokens_per_head
from .config import KVCompressConfig, flag_name


def install() -> None:
    import vllm.v1.engine.core as core

    if getattr(core.get_kv_cache_configs, "_kv_compress_patched", False):
        return
    original = core.get_kv_cache_configs

    @functools.wraps(original)
    def get_kv_cache_configs(vllm_config, *args, **kwargs):
        settings = KVCompressConfig.from_additional_config(vllm_config.additional_config)
        if settings is None or not settings.cascade:
            return original(vllm_config, *args, **kwargs)
        from vllm.v1.core import kv_cache_utils

        stock_check = kv_cache_utils._check_enough_kv_cache_memory
        kv_cache_utils._check_enough_kv_cache_memory = functools.partial(
            _check_compressed, settings, vllm_config)
        try:
            return original(vllm_config, *args, **kwargs)
        finally:
            kv_cache_utils._check_enough_kv_cache_memory = stock_check

    get_kv_cache_configs._kv_compress_patched = True
    core.get_kv_cache_configs = get_kv_cache_configs


def _check_compressed(settings, vllm_config, available_memory: int, get_needed_memory,
                      max_model_len: int, estimate_max_model_len) -> None:
    """Same contract as vLLM's check, for a cascading request of
    ``max_model_len`` tokens (KV memory is linear in tokens per head)."""
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    block_size = vllm_config.cache_config.block_size
    peak = peak_tokens_per_head(settings, max_model_len, chunk, block_size)
    needed = math.ceil(get_needed_memory() * peak / max_model_len)
    if available_memory <= 0 or needed > available_memory:
        budget = (f"{flag_name('kv_compress_max_tokens')} {settings.max_tokens}"
                  if settings.max_tokens is not None
                  else f"{flag_name('kv_compress_rate')} {settings.rate:g}")
        raise ValueError(
            f"{flag_name('kv_compress_cascade')}: a request of --max-model-len "
            f"{max_model_len} tokens holds up to {peak} KVs per head while its "
            f"prompt is read (its budget at {budget} plus one chunk of "
            f"--max-num-batched-tokens {chunk}): {needed / 2**30:.3f} GiB, more "
            "than the KV cache's "
            f"{max(available_memory, 0) / 2**30:.3f} GiB. Raise the rate, lower "
            "--max-num-batched-tokens or --max-model-len, or give the KV cache "
            f"more memory ({_memory_knob()})."
        )


def _memory_knob() -> str:
    """Where this platform's KV cache memory is set."""
    from vllm.platforms import current_platform

    return ("VLLM_CPU_KVCACHE_SPACE" if current_platform.is_cpu()
            else "--gpu-memory-utilization")
