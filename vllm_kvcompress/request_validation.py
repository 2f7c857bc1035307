"""Checks a request's compression fields before it reaches the engine.

vLLM validates ``SamplingParams`` against every custom logits processor in the
front end, turning a ``ValueError`` into HTTP 400 (and into an exception from
``LLM.generate``). This processor exists for that check only: it never
changes logits.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .config import KVCompressConfig, KVCompressConfigError

CLASS_PATH = "vllm_kvcompress.request_validation:KVCompressRequestValidator"
# Whether this front end's engine loaded a kvzap scorer (set at start-up).
scorer_available = False


class KVCompressRequestValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Raise a ``ValueError`` naming the first bad per-request field."""
        defaults = KVCompressConfig()
        for key, value in (sampling_params.extra_args or {}).items():
            try:
                defaults.for_request({key: value})
            except KVCompressConfigError as e:
                raise KVCompressConfigError(
                    f"per-request field {key!r} (vllm_xargs / extra_args): {e}"
                ) from None
        if (sampling_params.extra_args or {}).get("kv_compress_policy") == "kvzap" \
                and not scorer_available:
            raise KVCompressConfigError(
                "per-request field 'kv_compress_policy' (vllm_xargs / extra_args): "
                "kvzap needs a trained scorer for this model, and the server has none; "
                "start it with --kv-compress-scorer FILE (python -m "
                "vllm_kvcompress.train_scorer MODEL --out FILE).")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
