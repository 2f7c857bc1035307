"""Per-head paged attention (decode and prefill chunks over cached KVs).

Every (request, KV head) row has its own block-table row and length.  Query head
``q`` of a request reads KV head ``q // G``; the G query heads of a group are
scored together against one load of the head's keys (KVs are never expanded).

Causality inside a chunk is by logical index: the chunk's own KVs were appended
at the end of every head, so query ``i`` of a chunk of ``c`` queries in a head of
length ``L`` sees the head's first ``L - c + i + 1`` KVs (decode: ``c = 1``, all
``L``).  A query that sees no KV outputs zeros.

Triton path: flash-decoding.  Grid = rows x query tiles x key splits; a query
tile holds the flattened (chunk query, group head) pairs of one row.  Each
program runs an online softmax over its split of the head's keys; when there is
more than one split a small second kernel merges the per-split partial outputs by
their log-sum-exp.  The number of splits is picked so that the grid has a few
programs per SM.  Accumulation is fp32; the output has the query dtype.
"""

from __future__ import annotations

import torch

from ._common import logical_slots, split_slots
from ._triton_guard import HAS_TRITON, cdiv, dot_flags, next_pow2, num_sms, require_triton

if HAS_TRITON:
    from ._triton_common import scaled_scores, weighted_values
    from ._triton_guard import tl, triton

__all__ = ["paged_attention", "paged_attention_ref"]

# Launch heuristics of the Triton path (a benchmark may override them).
#  programs_per_sm: key splits are chosen so the grid has about this many programs per SM
#  min_split: fewest keys per split
#  block_n: keys per inner-loop tile (None: pick from the query tile and head dim)
TUNING = {"programs_per_sm": 4, "min_split": 256, "block_n": None, "num_warps": 4, "num_stages": 2}


def _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc):
    if query.dim() != 3:
        raise ValueError(f"query must be [T, H*G, D], got {tuple(query.shape)}")
    _, hq, d = query.shape
    r = query_start_loc.numel() - 1
    n_rows = block_tables.shape[0]
    if r <= 0 or n_rows % r:
        raise ValueError(f"block_tables rows ({n_rows}) must be a multiple of R ({r})")
    h = n_rows // r
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if key_cache.dim() != 3 or key_cache.shape[2] != d or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must both be [P, block_size, D]")
    if seq_lens.shape != (n_rows,):
        raise ValueError("seq_lens must be [N_rows]")
    return r, h, hq // h, d, key_cache.shape[1]


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    max_query_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain-torch version of :func:`paged_attention` (gathers + softmax, fp32).

    ``max_seq_len``, ``max_query_len`` and ``num_splits`` are accepted for
    signature parity and ignored.
    """
    r, h, g, d, bs = _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    if out is None:
        out = torch.empty_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for req in range(r):
        q0, q1 = qsl[req], qsl[req + 1]
        c = q1 - q0
        if c == 0:
            continue
        rows = slice(req * h, (req + 1) * h)
        lmax = max(lens[rows])
        slots, valid = logical_slots(block_tables[rows], seq_lens[rows], bs, lmax)
        blk, off = split_slots(slots, bs)
        k = key_cache[blk, off].to(torch.float32)  # [H, lmax, D]
        v = value_cache[blk, off].to(torch.float32)
        q = query[q0:q1].to(torch.float32).reshape(c, h, g, d)
        s = torch.einsum("chgd,hkd->hcgk", q, k) * scale  # [H, c, G, lmax]
        # Query i sees the first L - c + i + 1 KVs of its head.
        limit = seq_lens[rows].to(torch.int64)[:, None] - c + 1 + torch.arange(c, device=s.device)
        idx = torch.arange(lmax, device=s.device)
        vis = (idx[None, None, :] < limit[:, :, None]) & valid[:, None, :]  # [H, c, lmax]
        vis = vis[:, :, None, :]
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0) * vis
        o = torch.einsum("hcgk,hkd->chgd", p, v)
        out[q0:q1] = o.reshape(c, h * g, d).to(out.dtype)
    return out


if HAS_TRITON:

    @triton.jit
    def _paged_attn_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, qsl_ptr,
        out_ptr, part_out_ptr, part_lse_ptr,
        scale, num_kv_heads, split_size, n_tokens, n_qheads,
        s_qt, s_qh, s_kp, s_kt, s_vp, s_vt, s_bt, s_ot, s_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        row = tl.program_id(0)
        qt = tl.program_id(1)
        sp = tl.program_id(2)
        req = row // num_kv_heads
        h = row % num_kv_heads
        q_start = tl.load(qsl_ptr + req)
        c = tl.load(qsl_ptr + req + 1) - q_start
        seq_len = tl.load(lens_ptr + row)

        i = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qvalid = i < c * G
        j = i // G  # query index inside the chunk
        tok = (q_start + j).to(tl.int64)
        qh = h * G + i % G
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(
            q_ptr + tok[:, None] * s_qt + qh[:, None] * s_qh + d[None, :],
            mask=qvalid[:, None] & dmask[None, :], other=0.0,
        )
        limit = tl.where(qvalid, seq_len - c + j + 1, 0)  # visible KV count per query

        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        lo = sp * split_size
        hi = tl.minimum(lo + split_size, tl.max(limit, axis=0))
        bt_row = bt_ptr + row.to(tl.int64) * s_bt
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < hi
            blk = tl.load(bt_row + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            off = n % BLOCK_SIZE
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(
                k_ptr + blk[:, None] * s_kp + off[:, None] * s_kt + d[None, :],
                mask=kv_mask, other=0.0,
            )
            v = tl.load(
                v_ptr + blk[:, None] * s_vp + off[:, None] * s_vt + d[None, :],
                mask=kv_mask, other=0.0,
            )
            s = scaled_scores(q, k, scale, UPCAST, IEEE)
            vis = nmask[None, :] & (n[None, :] < limit[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + weighted_values(p, v, UPCAST, IEEE)
            m_i = m_new

        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        omask = qvalid[:, None] & dmask[None, :]
        if SPLIT:
            # Partial result of this split: normalised output + its log-sum-exp
            # (-1e30 when the split saw nothing, which gives it zero weight).
            lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), -1.0e30)
            base = (sp * n_tokens + tok) * n_qheads + qh
            tl.store(part_lse_ptr + base, lse, mask=qvalid)
            tl.store(part_out_ptr + base[:, None] * BLOCK_D + d[None, :], o, mask=omask)
        else:
            tl.store(
                out_ptr + tok[:, None] * s_ot + qh[:, None] * s_oh + d[None, :],
                o.to(out_ptr.dtype.element_ty), mask=omask,
            )

    @triton.jit
    def _merge_splits_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, n_splits, n_tokens, n_qheads, s_ot, s_oh,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        qh = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        sidx = tl.arange(0, BLOCK_S)
        stride_s = n_tokens * n_qheads
        base = tok * n_qheads + qh
        m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sm = (s0 + sidx) < n_splits
            lse = tl.load(part_lse_ptr + (s0 + sidx) * stride_s + base, mask=sm, other=float("-inf"))
            m_vec = tl.maximum(m_vec, lse)
        m = tl.max(m_vec, axis=0)
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        den = tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sm = (s0 + sidx) < n_splits
            row = (s0 + sidx) * stride_s + base
            lse = tl.load(part_lse_ptr + row, mask=sm, other=float("-inf"))
            wgt = tl.exp(lse - m)
            o = tl.load(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], mask=sm[:, None], other=0.0)
            acc += wgt[:, None] * o
            den += wgt
        total = tl.sum(den, axis=0)
        o = tl.sum(acc, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + tok * s_ot + qh * s_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    max_query_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Per-head paged attention (Triton).

    Args:
        query: ``[T, H*G, D]`` queries of R requests, request ``r`` owning tokens
            ``query_start_loc[r]:query_start_loc[r+1]``.
        key_cache, value_cache: ``[P, block_size, D]`` head-block pools (strided
            views allowed, last dim contiguous).
        block_tables: ``[R*H, max_blocks]`` int32, row ``r*H+h``.
        seq_lens: ``[R*H]`` int32 per-head length INCLUDING the chunk's own KVs.
        query_start_loc: ``[R+1]`` int32 cumulative query counts.
        scale: softmax scale.
        out: optional ``[T, H*G, D]`` output buffer.
        max_seq_len: upper bound of ``seq_lens`` (default: table capacity); used
            only to size the key splits, pass it to avoid idle programs.
        max_query_len: longest chunk (default: computed, which syncs the device;
            pass 1 for decode).
        num_splits: force the number of key splits (default: automatic).
    """
    require_triton(query, key_cache)
    r, h, g, d, bs = _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    if key_cache.stride(2) != 1 or value_cache.stride(2) != 1 or query.stride(2) != 1:
        raise ValueError("the head dimension (last) must be contiguous")
    t, hq, _ = query.shape
    if out is None:
        out = torch.empty_like(query)
    n_rows = r * h
    cap = block_tables.shape[1] * bs
    if t == 0 or n_rows == 0:
        return out
    if cap == 0:
        return out.zero_()
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    max_seq_len = cap if max_seq_len is None else max(1, min(int(max_seq_len), cap))

    upcast, ieee = dot_flags(query.dtype)
    block_d = max(16, next_pow2(d))
    n_q = max(1, max_query_len) * g
    block_q = max(16, min(64, next_pow2(n_q)))
    block_n = TUNING["block_n"] or (max(bs, 64 if block_q <= 16 else 32) if block_d <= 128 else max(bs, 32))
    block_n = max(block_n, bs)
    n_qt = cdiv(n_q, block_q)
    if num_splits is None:
        target = TUNING["programs_per_sm"] * num_sms(query.device)
        num_splits = max(1, min(cdiv(max_seq_len, TUNING["min_split"]), cdiv(target, n_rows * n_qt)))
    split_size = cdiv(cdiv(max_seq_len, max(1, num_splits)), block_n) * block_n
    n_splits = cdiv(max_seq_len, split_size)

    device = query.device
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    lens = seq_lens.to(torch.int32)
    qsl = query_start_loc.to(torch.int32)
    split = n_splits > 1
    if split:
        part_out = torch.empty(n_splits, t, hq, block_d, dtype=torch.float32, device=device)
        part_lse = torch.empty(n_splits, t, hq, dtype=torch.float32, device=device)
    else:
        part_out = part_lse = out  # unused
    _paged_attn_kernel[(n_rows, n_qt, n_splits)](
        query, key_cache, value_cache, bt, lens, qsl, out, part_out, part_lse,
        float(scale), h, split_size, t, hq,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1), bt.stride(0), out.stride(0), out.stride(1),
        G=g, D=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=bs,
        SPLIT=split, UPCAST=upcast, IEEE=ieee,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    if split:
        _merge_splits_kernel[(t, hq)](
            part_out, part_lse, out, n_splits, t, hq, out.stride(0), out.stride(1),
            D=d, BLOCK_D=block_d, BLOCK_S=min(16, next_pow2(n_splits)), num_warps=4,
        )
    return out
