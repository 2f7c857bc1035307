"""Cache write: scatter new K/V of every (token, KV head) into its own head-block slot.

``slot_mapping [T, H]`` int64 gives, for token ``t`` and KV head ``h``, the slot
(block_id * block_size + offset) that receives ``key[t, h]`` / ``value[t, h]``;
``-1`` skips the pair.  Optionally the slot's eviction metric is reset to 0 and
its token position is set to ``positions[t]``.  Values are cast to the cache dtype.
"""

from __future__ import annotations

import torch

from ._triton_guard import HAS_TRITON, cdiv, next_pow2, require_triton

if HAS_TRITON:
    from ._triton_guard import tl, triton

__all__ = ["write_kv_cache", "write_kv_cache_ref"]


def _check(key, value, slot_mapping, key_cache, value_cache, kv_metric, kv_position, positions):
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError("key and value must both be [T, H, D]")
    if tuple(slot_mapping.shape) != tuple(key.shape[:2]):
        raise ValueError("slot_mapping must be [T, H]")
    if key_cache.dim() != 3 or value_cache.shape != key_cache.shape or key_cache.shape[2] != key.shape[2]:
        raise ValueError("key_cache and value_cache must both be [P, block_size, D]")
    if kv_position is not None and positions is None:
        raise ValueError("kv_position needs positions [T]")
    if positions is not None and positions.shape != (key.shape[0],):
        raise ValueError("positions must be [T]")


def write_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_metric: torch.Tensor | None = None,
    kv_position: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> None:
    """Plain-torch version of :func:`write_kv_cache` (in place)."""
    _check(key, value, slot_mapping, key_cache, value_cache, kv_metric, kv_position, positions)
    bs = key_cache.shape[1]
    sm = slot_mapping.to(torch.int64)
    keep = sm >= 0
    slots = sm[keep]
    b, o = slots // bs, slots % bs
    key_cache[b, o] = key[keep].to(key_cache.dtype)
    value_cache[b, o] = value[keep].to(value_cache.dtype)
    if kv_metric is not None:
        kv_metric[b, o] = 0
    if kv_position is not None:
        pos = positions[:, None].expand_as(sm)[keep]
        kv_position[b, o] = pos.to(kv_position.dtype)


if HAS_TRITON:

    @triton.jit
    def _cache_write_kernel(
        k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, metric_ptr, kvpos_ptr, pos_ptr,
        n_pairs, num_heads,
        s_kt, s_kh, s_vt, s_vh, s_st, s_sh, s_kcp, s_kct, s_vcp, s_vct, s_mp, s_mt, s_pp, s_pt,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_METRIC: tl.constexpr, HAS_POS: tl.constexpr,
    ):
        pi = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        t = (pi // num_heads).to(tl.int64)
        h = pi % num_heads
        slot = tl.load(slot_ptr + t * s_st + h * s_sh, mask=pi < n_pairs, other=-1).to(tl.int64)
        ok = slot >= 0
        b = tl.where(ok, slot, 0) // BLOCK_SIZE
        o = tl.where(ok, slot, 0) % BLOCK_SIZE
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            msk = ok[:, None] & (d[None, :] < D)
            k = tl.load(k_ptr + (t * s_kt + h * s_kh)[:, None] + d[None, :], mask=msk)
            tl.store(kc_ptr + (b * s_kcp + o * s_kct)[:, None] + d[None, :],
                     k.to(kc_ptr.dtype.element_ty), mask=msk)
            v = tl.load(v_ptr + (t * s_vt + h * s_vh)[:, None] + d[None, :], mask=msk)
            tl.store(vc_ptr + (b * s_vcp + o * s_vct)[:, None] + d[None, :],
                     v.to(vc_ptr.dtype.element_ty), mask=msk)
        if HAS_METRIC:
            tl.store(metric_ptr + b * s_mp + o * s_mt,
                     tl.zeros([BLOCK_M], tl.float32).to(metric_ptr.dtype.element_ty), mask=ok)
        if HAS_POS:
            p = tl.load(pos_ptr + t, mask=ok, other=0)
            tl.store(kvpos_ptr + b * s_pp + o * s_pt, p.to(kvpos_ptr.dtype.element_ty), mask=ok)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_metric: torch.Tensor | None = None,
    kv_position: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> None:
    """Write ``key``/``value [T, H, D]`` into the head-block pool (Triton).

    Args:
        slot_mapping: ``[T, H]`` int64 destination slot per (token, KV head); -1 skips.
        key_cache, value_cache: ``[P, block_size, D]`` (strided views allowed, last dim contiguous).
        kv_metric: optional ``[P, block_size]`` float32; written slots are reset to 0.
        kv_position: optional ``[P, block_size]`` int32; written slots get ``positions[t]``.
        positions: ``[T]`` int token positions (required with ``kv_position``).
    """
    require_triton(key, key_cache)
    _check(key, value, slot_mapping, key_cache, value_cache, kv_metric, kv_position, positions)
    for x in (key, value, key_cache, value_cache):
        if x.stride(2) != 1:
            raise ValueError("the head dimension (last) must be contiguous")
    t, h, d = key.shape
    n = t * h
    if n == 0:
        return
    block_d = min(128, next_pow2(d))
    block_m = max(1, 2048 // block_d)
    met = kv_metric if kv_metric is not None else key_cache
    kvp = kv_position if kv_position is not None else key_cache
    pos = positions if positions is not None else slot_mapping
    _cache_write_kernel[(cdiv(n, block_m),)](
        key, value, slot_mapping, key_cache, value_cache, met, kvp, pos, n, h,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        slot_mapping.stride(0), slot_mapping.stride(1),
        key_cache.stride(0), key_cache.stride(1), value_cache.stride(0), value_cache.stride(1),
        met.stride(0), met.stride(1), kvp.stride(0), kvp.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_SIZE=key_cache.shape[1],
        HAS_METRIC=kv_metric is not None, HAS_POS=kv_position is not None, num_warps=4,
    )
