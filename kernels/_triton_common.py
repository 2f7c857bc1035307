"""Triton device helpers shared by several kernels (defined only with Triton)."""

from __future__ import annotations

from ._triton_guard import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_scores(q, k, scale, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """``scale * q @ k.T`` for a query tile and a key tile. UPCAST runs the
        dot in fp32 (the CPU interpreter mishandles bf16 dots); IEEE asks for
        exact fp32 products."""
        if UPCAST:
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k))
        return s * scale

    @triton.jit
    def weighted_values(p, v, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """``p @ v`` for a tile of fp32 probabilities and a value tile, with
        the same precision rules as ``scaled_scores`` (on tensor cores the
        probabilities go in the values' dtype, accumulation in fp32)."""
        if UPCAST:
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p, v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return pv
