"""Implementations of the per-head ops over the head-block pool: write cache,
attend, move slots (compaction), and where K sits inside a head-block.

- ``cpu``: vLLM's C++ CPU kernels (the default on CPU; CPU only);
- ``triton``: the Triton kernels of ``kernels/`` (the CUDA path's; on CPU only
  under ``TRITON_INTERPRET=1``, for tests);
- ``flash``: vLLM's FlashAttention in the one-head-sequence view for
  attention, the Triton kernels for the rest (the default on CUDA; CUDA only);
- ``flash-reference``: the same with a plain-torch stand-in for
  FlashAttention (tests of that view on CPU, with ``TRITON_INTERPRET=1``);
- ``torch``: plain torch, the oracle.
Window statistics run in torch (``compression/metrics.py``, ``cake.py``),
except that the Triton ops bring the statistics kernel for them.
``VLLM_KVCOMPRESS_OPS`` overrides the platform's default (tests and debugging).
"""

from __future__ import annotations

import os

OPS_ENV = "VLLM_KVCOMPRESS_OPS"
OPS_NAMES = ("cpu", "triton", "flash", "flash-reference", "torch")


def make_ops(default: str, isa: str | None = None):
    """The ops ``VLLM_KVCOMPRESS_OPS`` names, else the platform's ``default``
    ("cpu" with vLLM's CPU kernel ``isa``, or "flash")."""
    name = os.environ.get(OPS_ENV, default)
    if name == "cpu":
        if isa is None:
            raise ValueError(
                f"{OPS_ENV}=cpu runs vLLM's CPU kernels, which exist only in "
                "vLLM's CPU build; on CUDA use flash or triton.")
        from .cpu import CpuOps

        return CpuOps(isa)
    if name == "triton":
        from .triton import TritonOps

        return TritonOps()
    if name == "flash":
        from .flash import FlashOps

        return FlashOps()
    if name == "flash-reference":
        from .flash import FlashOps
        from .flash_reference import flash_reference

        return FlashOps(varlen=flash_reference)
    if name == "torch":
        from .torch_ref import TorchOps

        return TorchOps()
    raise ValueError(f"{OPS_ENV} must be one of {', '.join(OPS_NAMES)}; got {name!r}.")
