"""Compaction: move KVs inside the head-block pool in one launch.

``moves [M, 2]`` int64 holds ``(src_slot, dst_slot)`` pairs (slot = block_id *
block_size + offset).  For every pair the key, the value, the eviction metric and
the token position of ``src`` are copied to ``dst``.  All sources are distinct
from all destinations, so the copies are independent and their order is free.
The source slots are left as they are (they are freed by the caller).
"""

from __future__ import annotations

import torch

from ._triton_guard import HAS_TRITON, cdiv, next_pow2, require_triton

if HAS_TRITON:
    from ._triton_guard import tl, triton

__all__ = ["compact_kv", "compact_kv_ref"]


def _check(moves, key_cache, value_cache, kv_metric, kv_position):
    if moves.dim() != 2 or moves.shape[1] != 2:
        raise ValueError(f"moves must be [M, 2], got {tuple(moves.shape)}")
    if key_cache.dim() != 3 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must both be [P, block_size, D]")
    for name, t in (("kv_metric", kv_metric), ("kv_position", kv_position)):
        if t is not None and tuple(t.shape) != tuple(key_cache.shape[:2]):
            raise ValueError(f"{name} must be [P, block_size]")


def compact_kv_ref(
    moves: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_metric: torch.Tensor | None = None,
    kv_position: torch.Tensor | None = None,
) -> None:
    """Plain-torch version of :func:`compact_kv` (in place, works on strided views)."""
    _check(moves, key_cache, value_cache, kv_metric, kv_position)
    if moves.shape[0] == 0:
        return
    bs = key_cache.shape[1]
    mv = moves.to(device=key_cache.device, dtype=torch.int64)
    sb, so = mv[:, 0] // bs, mv[:, 0] % bs
    db, do = mv[:, 1] // bs, mv[:, 1] % bs
    for t in (key_cache, value_cache, kv_metric, kv_position):
        if t is not None:
            t[db, do] = t[sb, so]


if HAS_TRITON:

    @triton.jit
    def _compact_kernel(
        moves_ptr, k_ptr, v_ptr, metric_ptr, pos_ptr, n_moves,
        s_kp, s_kt, s_vp, s_vt, s_mp, s_mt, s_pp, s_pt,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_METRIC: tl.constexpr, HAS_POS: tl.constexpr,
    ):
        mi = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = mi < n_moves
        src = tl.load(moves_ptr + mi.to(tl.int64) * 2, mask=mm, other=0)
        dst = tl.load(moves_ptr + mi.to(tl.int64) * 2 + 1, mask=mm, other=0)
        sb = src // BLOCK_SIZE
        so = src % BLOCK_SIZE
        db = dst // BLOCK_SIZE
        do = dst % BLOCK_SIZE
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            msk = mm[:, None] & (d[None, :] < D)
            k = tl.load(k_ptr + (sb * s_kp + so * s_kt)[:, None] + d[None, :], mask=msk)
            tl.store(k_ptr + (db * s_kp + do * s_kt)[:, None] + d[None, :], k, mask=msk)
            v = tl.load(v_ptr + (sb * s_vp + so * s_vt)[:, None] + d[None, :], mask=msk)
            tl.store(v_ptr + (db * s_vp + do * s_vt)[:, None] + d[None, :], v, mask=msk)
        if HAS_METRIC:
            x = tl.load(metric_ptr + sb * s_mp + so * s_mt, mask=mm)
            tl.store(metric_ptr + db * s_mp + do * s_mt, x, mask=mm)
        if HAS_POS:
            y = tl.load(pos_ptr + sb * s_pp + so * s_pt, mask=mm)
            tl.store(pos_ptr + db * s_pp + do * s_pt, y, mask=mm)


def compact_kv(
    moves: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_metric: torch.Tensor | None = None,
    kv_position: torch.Tensor | None = None,
) -> None:
    """Copy K, V, metric and position from each ``moves[:, 0]`` slot to ``moves[:, 1]`` (Triton).

    Args:
        moves: ``[M, 2]`` int64 (src_slot, dst_slot); srcs and dsts are disjoint sets.
        key_cache, value_cache: ``[P, block_size, D]`` (strided views allowed, last dim contiguous).
        kv_metric: optional ``[P, block_size]`` float32.
        kv_position: optional ``[P, block_size]`` int32.
    """
    require_triton(key_cache)
    _check(moves, key_cache, value_cache, kv_metric, kv_position)
    if key_cache.stride(2) != 1 or value_cache.stride(2) != 1:
        raise ValueError("the head dimension (last) must be contiguous")
    n = moves.shape[0]
    if n == 0:
        return
    mv = moves if (moves.dtype == torch.int64 and moves.is_contiguous()) else moves.to(torch.int64).contiguous()
    d = key_cache.shape[2]
    block_d = min(128, next_pow2(d))
    block_m = max(1, 4096 // block_d)
    met = kv_metric if kv_metric is not None else key_cache
    pos = kv_position if kv_position is not None else key_cache
    _compact_kernel[(cdiv(n, block_m),)](
        mv, key_cache, value_cache, met, pos, n,
        key_cache.stride(0), key_cache.stride(1), value_cache.stride(0), value_cache.stride(1),
        met.stride(0), met.stride(1), pos.stride(0), pos.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_SIZE=key_cache.shape[1],
        HAS_METRIC=kv_metric is not None, HAS_POS=kv_position is not None, num_warps=4,
    )
