"""Shared fixtures: real model checkpoints (built once, cached)."""

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Without a GPU the Triton kernels run in Triton's interpreter, which must be
# switched on before anything imports them. With one (tests/kernels on a GPU
# machine) they must be compiled, or the GPU run checks the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_kvcompress.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_llama(smollm2) -> str:
    """2 layers, 8 query heads over 2 KV heads (GQA group of 4), random."""
    from vllm_kvcompress.assets import tiny_llama_path

    return tiny_llama_path()
