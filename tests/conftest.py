"""Shared fixtures: real model checkpoints (built once, cached)."""

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM 0.32's CPU build saves its ahead-of-time compiled model but cannot
# load it back ("'function' object has no attribute 'finalize_loading'"),
# so with the default every compiled engine compiles afresh (~70 s for
# SmolLM2 on 2 cores). Its older compile cache loads (~15 s). The mode is
# the same (Dynamo + Inductor around the attention ops), for stock and
# plugin alike; only how the compiled code is cached differs.
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
# Without a GPU the Triton kernels run in Triton's interpreter, which must be
# switched on before anything imports them. With one (tests/kernels on a GPU
# machine) they must be compiled, or the GPU run checks the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _bind_engines_to_this_workers_core() -> None:
    """``scripts/test.sh`` runs one pytest-xdist worker per core. vLLM's CPU
    engine computes in one thread, and its "auto" binding puts that thread
    on the same core for every engine (it keeps core 0 for the scheduler),
    so the two workers' engines would queue for one core while the other
    idles. Each worker's engines and servers get a core of their own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[int(worker[2:]) % len(cores)])


_bind_engines_to_this_workers_core()


def pytest_collection_modifyitems(items):
    """Engine files first (each file stays whole and in order): with one
    worker per core and a file per worker at a time, a long engine file
    started last would run on alone after the other worker ran dry."""
    def starts_engines(item) -> bool:
        return item.get_closest_marker("engine") is not None

    items.sort(key=lambda item: not starts_engines(item))


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_kvcompress.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_llama(smollm2) -> str:
    """2 layers, 8 query heads over 2 KV heads (GQA group of 4), random."""
    from vllm_kvcompress.assets import tiny_llama_path

    return tiny_llama_path()


@pytest.fixture(scope="session")
def tiny_llama_scorer(tiny_llama, tmp_path_factory) -> str:
    """An untrained kvzap scorer (seeded random weights) for the tiny Llama:
    for tests of where kvzap's scores go, not of what they keep."""
    from vllm_kvcompress.kvzap.untrained import write_untrained_scorer

    return str(write_untrained_scorer(
        tiny_llama, tmp_path_factory.mktemp("scorer") / "tiny-untrained.safetensors"))
