"""Attention statistics of observation-window queries over per-head paged KVs.

For every (request, KV head) row the G query heads of the group attend, for each
of the W window queries, over ALL keys of that head that are visible to the
query (key position <= query position; positions come from ``kv_position`` so
KVs may be permuted inside a head).  The softmax probabilities ``p`` are then
reduced over the window queries and the group's query heads into

* ``sum_p  [N_rows, max_len]``  = sum p      per logical KV index of the head,
* ``sum_p2 [N_rows, max_len]``  = sum p**2   (the KV-Compress L2 metric),
* ``entropy [N_rows]``          = sum over queries of -sum_k p log p; with
  ``entropy_before`` ([R] positions) only keys older than the request's
  threshold count (CAKE's dispersion over the keys before the window; the
  probabilities stay normalised over all visible keys).

KVs are never repeated per query head: a program loads a tile of one head's keys
once and scores it against all W*G queries of the group.  Accumulation is fp32.

Triton path: two passes.  Pass 1 (grid rows x query tiles x key splits) computes
each query's running max and sum of exponentials over its key split; a few torch
ops merge the splits into a log-sum-exp per query.  Pass 2 (grid rows x key
chunks x query tiles) keeps one query tile in registers, walks its chunk of the
row's keys, turns the scores into probabilities with the log-sum-exp and writes
the column sums of that key chunk; with more than one query tile the per-tile
partials are added by torch.  Every output element has one writer, so there are
no atomics and the result is deterministic.

A query with no visible key (e.g. a padded window entry with position -1)
contributes nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import logical_slots, split_slots
from ._triton_guard import HAS_TRITON, cdiv, dot_flags, next_pow2, num_sms, require_triton

if HAS_TRITON:
    from ._triton_common import scaled_scores
    from ._triton_guard import tl, triton

__all__ = ["AttentionStats", "attention_stats", "attention_stats_ref"]

# Launch heuristics of the Triton path (a benchmark may override them).
#  max_block_q: largest query tile; block_n: keys per inner tile; num_warps: for 128-query tiles;
#  programs_per_sm: key splits/chunks are sized for about this many programs per SM;
#  min_split: fewest keys per split/chunk
TUNING = {"max_block_q": 128, "block_n": 32, "num_warps": 4, "programs_per_sm": 8, "min_split": 256}


class AttentionStats(NamedTuple):
    sum_p: torch.Tensor  # [N_rows, max_len] float32
    sum_p2: torch.Tensor  # [N_rows, max_len] float32
    entropy: torch.Tensor  # [N_rows] float32


def _check(queries, query_positions, key_cache, block_tables, seq_lens, kv_position, max_len):
    if queries.dim() != 4:
        raise ValueError(f"queries must be [R, W, H*G, D], got {tuple(queries.shape)}")
    r, w, hq, d = queries.shape
    n_rows = block_tables.shape[0]
    if r == 0 or n_rows % r:
        raise ValueError(f"block_tables rows ({n_rows}) must be a multiple of R ({r})")
    h = n_rows // r
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if tuple(query_positions.shape) != (r, w):
        raise ValueError("query_positions must be [R, W]")
    if key_cache.dim() != 3 or key_cache.shape[2] != d:
        raise ValueError("key_cache must be [P, block_size, D]")
    if tuple(kv_position.shape) != tuple(key_cache.shape[:2]):
        raise ValueError("kv_position must be [P, block_size]")
    if seq_lens.shape != (n_rows,):
        raise ValueError("seq_lens must be [N_rows]")
    block_size = key_cache.shape[1]
    if max_len is None:
        max_len = block_tables.shape[1] * block_size
    return r, w, h, hq // h, d, block_size, int(max_len)


def attention_stats_ref(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_position: torch.Tensor,
    scale: float,
    max_len: int | None = None,
    entropy_before: torch.Tensor | None = None,
) -> AttentionStats:
    """Plain-torch version of :func:`attention_stats` (same signature and result).

    Vectorised over rows (chunked to bound memory); usable on CPU as the real
    implementation, and the oracle for the Triton kernel.
    """
    r, w, h, g, d, bs, max_len = _check(
        queries, query_positions, key_cache, block_tables, seq_lens, kv_position, max_len
    )
    n_rows = r * h
    device = key_cache.device
    cap = block_tables.shape[1] * bs
    length = max(cap, max_len)
    sum_p = torch.zeros(n_rows, length, dtype=torch.float32, device=device)
    sum_p2 = torch.zeros_like(sum_p)
    entropy = torch.zeros(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0 or cap == 0 or w == 0:
        return AttentionStats(sum_p[:, :max_len], sum_p2[:, :max_len], entropy)

    slots, valid = logical_slots(block_tables, seq_lens, bs, cap)
    blk, off = split_slots(slots, bs)
    # [R, W, H, G, D] -> [R*H, W*G, D]: row r*H+h holds its group's window queries.
    q = queries.reshape(r, w, h, g, d).permute(0, 2, 1, 3, 4).reshape(n_rows, w * g, d)
    qpos = query_positions.to(torch.int64).repeat_interleave(g, dim=1)  # [R, W*G]
    qpos = qpos.repeat_interleave(h, dim=0)  # [R*H, W*G]
    limit = _entropy_limits(entropy_before, r, h, device)  # [R*H]

    # Keep one chunk's score tensor around 32M elements.
    chunk = max(1, (1 << 25) // max(1, w * g * cap))
    for lo in range(0, n_rows, chunk):
        hi = min(n_rows, lo + chunk)
        keys = key_cache[blk[lo:hi], off[lo:hi]].to(torch.float32)  # [c, cap, D]
        kpos = kv_position[blk[lo:hi], off[lo:hi]].to(torch.int64)  # [c, cap]
        s = torch.einsum("rqd,rkd->rqk", q[lo:hi].to(torch.float32), keys) * scale
        vis = valid[lo:hi, None, :] & (kpos[:, None, :] <= qpos[lo:hi, :, None])
        s = s.masked_fill(~vis, float("-inf"))
        any_vis = vis.any(dim=-1, keepdim=True)
        s = torch.where(any_vis, s, torch.zeros_like(s))  # rows with nothing visible
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - lse) * vis
        sum_p[lo:hi, :cap] = p.sum(dim=1)
        sum_p2[lo:hi, :cap] = (p * p).sum(dim=1)
        counted = vis & (kpos[:, None, :] < limit[lo:hi, None, None])
        ent = torch.where(counted, p * (lse - s), torch.zeros_like(p))
        entropy[lo:hi] = ent.sum(dim=(1, 2))
    return AttentionStats(sum_p[:, :max_len], sum_p2[:, :max_len], entropy)


def _entropy_limits(entropy_before, r: int, h: int, device) -> torch.Tensor:
    """Per row: keys at positions below this count toward the entropy."""
    if entropy_before is None:
        return torch.full((r * h,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                          device=device)
    if tuple(entropy_before.shape) != (r,):
        raise ValueError("entropy_before must be [R]")
    return entropy_before.to(device=device, dtype=torch.int64).repeat_interleave(h)


if HAS_TRITON:

    @triton.jit
    def _load_queries(
        q_ptr, qpos_ptr, req, h, i, n_q, s_qr, s_qw, s_qh, s_pr, s_pw,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Flattened window index i -> (window query w, group head g).
        qvalid = i < n_q
        wq = i // G
        qh = h * G + i % G
        d = tl.arange(0, BLOCK_D)
        ptrs = q_ptr + req * s_qr + wq[:, None] * s_qw + qh[:, None] * s_qh + d[None, :]
        q = tl.load(ptrs, mask=qvalid[:, None] & (d[None, :] < D), other=0.0)
        qp = tl.load(qpos_ptr + req * s_pr + wq * s_pw, mask=qvalid, other=-1).to(tl.int64)
        return q, qp, qvalid

    @triton.jit
    def _load_keys(
        k_ptr, kvpos_ptr, bt_row_ptr, n, nmask, s_kp, s_kt, s_pp, s_pt,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        d = tl.arange(0, BLOCK_D)
        blk = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        off = n % BLOCK_SIZE
        kp = k_ptr + blk[:, None] * s_kp + off[:, None] * s_kt + d[None, :]
        k = tl.load(kp, mask=nmask[:, None] & (d[None, :] < D), other=0.0)
        kpos = tl.load(kvpos_ptr + blk * s_pp + off * s_pt, mask=nmask, other=0).to(tl.int64)
        return k, kpos

    @triton.jit
    def _stats_pass1_kernel(
        q_ptr, qpos_ptr, k_ptr, kvpos_ptr, bt_ptr, lens_ptr, m_ptr, l_ptr,
        scale, n_q, num_kv_heads, split_size, n_q_pad, n_splits,
        s_qr, s_qw, s_qh, s_pr, s_pw, s_kp, s_kt, s_pp, s_pt, s_bt,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        row = tl.program_id(0)
        qt = tl.program_id(1)
        sp = tl.program_id(2)
        req = row // num_kv_heads
        h = row % num_kv_heads
        seq_len = tl.load(lens_ptr + row)
        i = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q, qp, qvalid = _load_queries(
            q_ptr, qpos_ptr, req, h, i, n_q, s_qr, s_qw, s_qh, s_pr, s_pw, G, D, BLOCK_D
        )
        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        lo = sp * split_size
        hi = tl.minimum(lo + split_size, seq_len)
        bt_row = bt_ptr + row.to(tl.int64) * s_bt
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < hi
            k, kpos = _load_keys(
                k_ptr, kvpos_ptr, bt_row, n, nmask, s_kp, s_kt, s_pp, s_pt, D, BLOCK_D, BLOCK_SIZE
            )
            s = scaled_scores(q, k, scale, UPCAST, IEEE)
            vis = nmask[None, :] & (kpos[None, :] <= qp[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        out = (row.to(tl.int64) * n_splits + sp) * n_q_pad + i
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, l_i)

    @triton.jit
    def _stats_pass2_kernel(
        q_ptr, qpos_ptr, k_ptr, kvpos_ptr, bt_ptr, lens_ptr, lse_ptr, limit_ptr,
        sum_p_ptr, sum_p2_ptr, ent_ptr,
        scale, n_q, num_kv_heads, n_q_pad, max_len, chunk, n_rows, n_chunks,
        s_qr, s_qw, s_qh, s_pr, s_pw, s_kp, s_kt, s_pp, s_pt, s_bt, s_out,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program: one query tile of a row, held in registers, against one
        # chunk of the row's keys; writes that query tile's partial sums of the chunk.
        row = tl.program_id(0)
        ck = tl.program_id(1)
        qt = tl.program_id(2)
        req = row // num_kv_heads
        h = row % num_kv_heads
        seq_len = tl.load(lens_ptr + row)
        i = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q, qp, qvalid = _load_queries(
            q_ptr, qpos_ptr, req, h, i, n_q, s_qr, s_qw, s_qh, s_pr, s_pw, G, D, BLOCK_D
        )
        lse = tl.load(lse_ptr + row.to(tl.int64) * n_q_pad + i, mask=qvalid, other=0.0)
        limit = tl.load(limit_ptr + row)
        bt_row = bt_ptr + row.to(tl.int64) * s_bt
        out_row = (qt * n_rows + row).to(tl.int64)
        acc_e = tl.zeros([BLOCK_Q], tl.float32)
        lo = ck * chunk
        hi = tl.minimum(lo + chunk, seq_len)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < hi
            k, kpos = _load_keys(
                k_ptr, kvpos_ptr, bt_row, n, nmask, s_kp, s_kt, s_pp, s_pt, D, BLOCK_D, BLOCK_SIZE
            )
            s = scaled_scores(q, k, scale, UPCAST, IEEE)
            vis = qvalid[:, None] & nmask[None, :] & (kpos[None, :] <= qp[:, None])
            logp = tl.where(vis, s - lse[:, None], 0.0)
            p = tl.where(vis, tl.exp(logp), 0.0)
            optr = out_row * s_out + n
            omask = nmask & (n < max_len)
            tl.store(sum_p_ptr + optr, tl.sum(p, axis=0), mask=omask)
            tl.store(sum_p2_ptr + optr, tl.sum(p * p, axis=0), mask=omask)
            counted = vis & (kpos[None, :] < limit)
            acc_e += tl.sum(tl.where(counted, -p * logp, 0.0), axis=1)
        tl.store(ent_ptr + out_row * n_chunks + ck, tl.sum(acc_e, axis=0))


def attention_stats(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_position: torch.Tensor,
    scale: float,
    max_len: int | None = None,
    entropy_before: torch.Tensor | None = None,
) -> AttentionStats:
    """Per-KV attention statistics of window queries (Triton).

    Args:
        queries: ``[R, W, H*G, D]`` window queries of one layer (RoPE applied).
        query_positions: ``[R, W]`` int token positions of those queries; a key is
            visible iff its ``kv_position`` <= the query's position.  Use -1 for
            padded entries (they see nothing and add nothing).
        key_cache: ``[P, block_size, D]`` (last dim contiguous, other strides free).
        block_tables: ``[R*H, max_blocks]`` int32, row ``r*H+h``.
        seq_lens: ``[R*H]`` int32 number of KVs of each row (0 allowed).
        kv_position: ``[P, block_size]`` int32 token position of each slot.
        scale: softmax scale.
        max_len: width of the ``sum_p``/``sum_p2`` outputs (default: table capacity
            ``max_blocks * block_size``); must be >= ``max(seq_lens)``.
        entropy_before: ``[R]`` positions; when given, only keys at positions below
            the request's count toward ``entropy`` (default: every visible key).

    Returns:
        ``AttentionStats(sum_p [R*H, max_len], sum_p2 [R*H, max_len], entropy [R*H])``,
        float32, zero past each row's length.
    """
    require_triton(queries, key_cache)
    r, w, h, g, d, bs, max_len = _check(
        queries, query_positions, key_cache, block_tables, seq_lens, kv_position, max_len
    )
    if key_cache.stride(2) != 1 or queries.stride(3) != 1:
        raise ValueError("the head dimension (last) must be contiguous")
    n_rows = r * h
    device = key_cache.device
    n_q = w * g
    cap = block_tables.shape[1] * bs
    sum_p = torch.zeros(n_rows, max_len, dtype=torch.float32, device=device)
    sum_p2 = torch.zeros_like(sum_p)
    if n_rows == 0 or n_q == 0 or cap == 0:
        return AttentionStats(sum_p, sum_p2, torch.zeros(n_rows, dtype=torch.float32, device=device))

    upcast, ieee = dot_flags(queries.dtype)
    block_d = max(16, next_pow2(d))
    block_q = max(16, min(TUNING["max_block_q"], next_pow2(n_q)))
    block_n = max(bs, TUNING["block_n"])
    num_warps = TUNING["num_warps"] if block_q >= 128 else 4
    n_qt = cdiv(n_q, block_q)
    n_q_pad = n_qt * block_q
    length = cap
    # Split the keys of pass 1 so that the grid fills the device.
    target = TUNING["programs_per_sm"] * num_sms(device)
    n_splits = max(1, min(cdiv(length, TUNING["min_split"]), cdiv(target, n_rows * n_qt)))
    split_size = cdiv(cdiv(length, n_splits), block_n) * block_n
    n_splits = cdiv(length, split_size)

    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    lens = seq_lens.to(torch.int32)
    common_strides = (
        queries.stride(0), queries.stride(1), queries.stride(2),
        query_positions.stride(0), query_positions.stride(1),
        key_cache.stride(0), key_cache.stride(1),
        kv_position.stride(0), kv_position.stride(1), bt.stride(0),
    )
    consts = dict(
        G=g, D=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=bs,
        UPCAST=upcast, IEEE=ieee,
    )
    m = torch.empty(n_rows, n_splits, n_q_pad, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    _stats_pass1_kernel[(n_rows, n_qt, n_splits)](
        queries, query_positions, key_cache, kv_position, bt, lens, m, l,
        float(scale), n_q, h, split_size, n_q_pad, n_splits,
        *common_strides, **consts, num_warps=num_warps,
    )
    m_max = m.amax(dim=1, keepdim=True)
    denom = (l * torch.exp(m - m_max)).sum(dim=1)
    lse = torch.where(denom > 0, m_max.squeeze(1) + torch.log(denom), torch.zeros_like(denom))

    # Pass 2: rows x key chunks x query tiles; each query tile writes its own partials.
    n_chunks = max(1, min(cdiv(cap, TUNING["min_split"]), cdiv(target, n_rows * n_qt)))
    chunk = cdiv(cdiv(cap, n_chunks), block_n) * block_n
    n_chunks = cdiv(cap, chunk)
    if n_qt == 1:
        part_p, part_p2 = sum_p, sum_p2
    else:
        part_p = torch.zeros(n_qt, n_rows, max_len, dtype=torch.float32, device=device)
        part_p2 = torch.zeros_like(part_p)
    ent_part = torch.empty(n_qt, n_rows, n_chunks, dtype=torch.float32, device=device)
    limit = _entropy_limits(entropy_before, r, h, device)
    _stats_pass2_kernel[(n_rows, n_chunks, n_qt)](
        queries, query_positions, key_cache, kv_position, bt, lens, lse.contiguous(), limit,
        part_p, part_p2, ent_part,
        float(scale), n_q, h, n_q_pad, max_len, chunk, n_rows, n_chunks,
        *common_strides, max_len, **consts, num_warps=num_warps,
    )
    if n_qt > 1:
        sum_p, sum_p2 = part_p.sum(dim=0), part_p2.sum(dim=0)
    return AttentionStats(sum_p, sum_p2, ent_part.sum(dim=(0, 2)))
