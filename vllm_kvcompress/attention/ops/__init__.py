"""Implementations of the per-head attention ops (write cache, attend) over
the head-block pool: vLLM's C++ CPU kernels and a plain-torch oracle."""
