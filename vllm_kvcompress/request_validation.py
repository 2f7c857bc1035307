"""Checks a request's compression fields before it reaches the engine.

vLLM validates ``SamplingParams`` against every custom logits processor in the
front end, turning a ``ValueError`` into HTTP 400 (and into an exception from
``LLM.generate``). This processor exists for that check only: it never
changes logits.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .config import KVCompressConfig

CLASS_PATH = "vllm_kvcompress.request_validation:KVCompressRequestValidator"


class KVCompressRequestValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # Raises KVCompressConfigError (a ValueError) naming the bad field.
        KVCompressConfig().for_request(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
