"""Kernel-test setup.

* Without CUDA, Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1``
  must be set before the kernel modules are imported (Triton reads it when a kernel
  is decorated), so it is set here, at conftest import time.
* Until the project's pyproject maps ``kernels/`` to the import name
  ``vllm_kvcompress_kernels``, load that folder under that name by path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_NAME = "vllm_kvcompress_kernels"
_DIR = Path(__file__).resolve().parents[2] / "kernels"


def _ensure_importable() -> None:
    if _NAME in sys.modules:
        return
    try:
        if importlib.util.find_spec(_NAME) is not None:
            return
    except (ImportError, ValueError):
        pass
    spec = importlib.util.spec_from_file_location(
        _NAME, _DIR / "__init__.py", submodule_search_locations=[str(_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)


_ensure_importable()
