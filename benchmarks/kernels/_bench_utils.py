"""Shared helpers of the kernel micro-benchmarks (GPU only)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

_NAME = "vllm_kvcompress_kernels"
_DIR = Path(__file__).resolve().parents[2] / "kernels"


def import_kernels():
    """Import ``vllm_kvcompress_kernels``, loading ``kernels/`` by path if not installed."""
    if _NAME not in sys.modules:
        try:
            found = importlib.util.find_spec(_NAME) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            spec = importlib.util.spec_from_file_location(
                _NAME, _DIR / "__init__.py", submodule_search_locations=[str(_DIR)]
            )
            mod = importlib.util.module_from_spec(spec)
            sys.modules[_NAME] = mod
            spec.loader.exec_module(mod)
    return importlib.import_module(_NAME)


def package_without_plugin() -> None:
    """Make ``vllm_kvcompress``'s modules importable without the package's
    ``__init__``, which registers the vLLM plugin and so needs vLLM (the GPU
    machines have torch and Triton only)."""
    if "vllm_kvcompress" not in sys.modules:
        import types

        package = types.ModuleType("vllm_kvcompress")
        package.__path__ = [str(_DIR.parent / "vllm_kvcompress")]
        sys.modules["vllm_kvcompress"] = package


_FLUSH: torch.Tensor | None = None


def wall_times(fn, device: torch.device, runs: int) -> list[float]:
    """Wall seconds of ``runs`` calls of ``fn`` after one warm-up call (which
    compiles), the device synchronised around each; also works on a CPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(runs + 1):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times[1:]


def _flush_l2() -> None:
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _FLUSH.zero_()


def time_ms(fn, warmup: int = 5, iters: int = 30, flush: bool = True, setup=None) -> float:
    """Median GPU milliseconds of ``fn()`` with CUDA events.

    Before each timed call the L2 cache is flushed and the GPU is kept busy with a
    ~1 ms spin, so that the host-side cost of launching ``fn`` (Python wrapper,
    Triton launch) is hidden and the events measure device time only, as under
    CUDA graphs in the engine."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if setup is not None:
            setup()
        if flush:
            _flush_l2()
        torch.cuda._sleep(2_000_000)
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth (read + write bytes per second) of one big tensor copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, iters=20, flush=False)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_big_pool(r, h, length, bs, d, dtype, seed=0):
    """Shuffled pool holding R*H rows of ``length`` KVs each; kv_position = logical index."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    nb = -(-length // bs)
    n_blocks = r * h * nb
    perm = torch.randperm(n_blocks, device="cuda", generator=gen)
    block_tables = perm.view(r * h, nb).to(torch.int32)
    kv = torch.randn(2, n_blocks, bs, 1, d, device="cuda", dtype=dtype, generator=gen)
    kv_position = torch.empty(n_blocks, bs, dtype=torch.int32, device="cuda")
    idx = torch.arange(nb * bs, device="cuda")
    slots = block_tables.long()[:, idx // bs] * bs + idx % bs
    kv_position.view(-1)[slots.view(-1)] = idx.repeat(r * h).to(torch.int32)
    kv_metric = torch.zeros(n_blocks, bs, device="cuda")
    seq_lens = torch.full((r * h,), length, dtype=torch.int32, device="cuda")
    return dict(kv=kv, key_cache=kv[0, :, :, 0, :], value_cache=kv[1, :, :, 0, :],
                block_tables=block_tables, seq_lens=seq_lens, kv_position=kv_position,
                kv_metric=kv_metric, slots=slots)


def dense_kv(pool):
    """[R*H, L, D] dense copies of K and V in logical order."""
    bs = pool["key_cache"].shape[1]
    s = pool["slots"]
    return pool["key_cache"][s // bs, s % bs], pool["value_cache"][s // bs, s % bs]
