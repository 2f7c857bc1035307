"""Optional Triton import.

The package must import on machines without CUDA and without Triton (CI, the CPU
engine).  Kernel modules define their ``@triton.jit`` functions only when
``HAS_TRITON`` is true; every public Triton wrapper calls :func:`require_triton`
first, so a missing Triton surfaces as one clear ``RuntimeError`` at call time
rather than an ``ImportError`` at import time.

``TRITON_INTERPRET=1`` (Triton's CPU interpreter) is read by Triton when a kernel
is *decorated*, i.e. when the kernel module is imported: set it before importing
this package if you want to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the environment
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # ImportError, or a broken install
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = exc


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear RuntimeError when a Triton kernel cannot run on ``tensors``."""
    if not HAS_TRITON:
        raise RuntimeError(
            "vllm_kvcompress_kernels: Triton is not importable "
            f"({TRITON_IMPORT_ERROR!r}); use the *_ref plain-torch functions instead"
        )
    if interpret_mode():
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(
                "vllm_kvcompress_kernels: Triton kernels need CUDA tensors (got a tensor on "
                f"{t.device}); set TRITON_INTERPRET=1 before importing the package to run them "
                "on CPU, or use the *_ref plain-torch functions"
            )


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessor count (a small constant in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(upcast_before_dot, ieee_fp32) for a kernel whose operands have ``dtype``.

    fp32 operands use full-precision (IEEE) dots so fp32 parity is tight.  The
    interpreter cannot multiply bf16 tiles (numpy has no bf16), so there both
    operands are upcast to fp32 first; on GPU, fp16/bf16 tiles go to the tensor
    cores natively with fp32 accumulation.
    """
    upcast = interpret_mode() or dtype == torch.float32
    return upcast, upcast
