"""Attention statistics: Triton kernel vs torch reference vs a naive float64 loop.

Tolerances (absolute on sum_p / sum_p2 / entropy, plus rtol 1e-4 for fp32 and
1e-3 for fp16/bf16): the kernel and the reference read the SAME low-precision
keys/queries and both accumulate in fp32, so only summation order differs.
"""

from __future__ import annotations

import math

import pytest
import torch

import vllm_kvcompress_kernels as K
from param_grid import grid
from vllm_kvcompress_kernels.testing import DEVICE, make_pool, row_keys, triton_ready

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-4, 1e-3), torch.bfloat16: (2e-4, 1e-3)}
_READY, _WHY = triton_ready()


def lengths(bs: int) -> list[int]:
    # empty head, odd length, exact block multiples, a single KV, partial block
    return [0, 2 * bs + 5, 2 * bs, 1, bs - 1, 3 * bs]


def make_case(bs, g, dtype, d=32, w=4, h=2, seed=0):
    lens = lengths(bs)
    r = len(lens) // h
    pool = make_pool(lens, bs, d, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    queries = torch.randn(r, w, h * g, d, generator=gen).to(dtype).to(DEVICE)
    max_pos = max(2 * n for n in lens)
    qpos = torch.randint(0, max_pos + 2, (r, w), generator=gen, dtype=torch.int32)
    qpos[0, 0] = -1  # a padded window entry: sees nothing
    qpos[-1, -1] = max_pos + 5  # sees everything
    return pool, queries, qpos.to(DEVICE)


def call(fn, pool, queries, qpos, scale, max_len=None, entropy_before=None):
    kc, _ = pool["kv"][0, :, :, 0, :], None
    return fn(queries, qpos, kc, pool["block_tables"], pool["seq_lens"], pool["kv_position"],
              scale, max_len=max_len, entropy_before=entropy_before)


def naive(pool, queries, qpos, scale, max_len, entropy_before=None):
    """Independent float64 oracle: loop over rows and queries, dense softmax."""
    r, w, hq, d = queries.shape
    n_rows = pool["block_tables"].shape[0]
    h = n_rows // r
    g = hq // h
    sum_p = torch.zeros(n_rows, max_len, dtype=torch.float64)
    sum_p2 = torch.zeros_like(sum_p)
    ent = torch.zeros(n_rows, dtype=torch.float64)
    for row in range(n_rows):
        req, head = divmod(row, h)
        keys, kpos = row_keys(pool, row)
        keys = keys.cpu().double()
        for wi in range(w):
            for gi in range(g):
                q = queries[req, wi, head * g + gi].cpu().double()
                vis = kpos <= int(qpos[req, wi])
                if not bool(vis.any()):
                    continue
                s = (keys @ q) * scale
                s[~vis] = -math.inf
                p = torch.softmax(s, dim=0)
                sum_p[row, : len(p)] += p
                sum_p2[row, : len(p)] += p * p
                counted = p > 0
                if entropy_before is not None:
                    counted &= kpos < int(entropy_before[req])
                ent[row] -= torch.where(counted, p * torch.log(p), torch.zeros_like(p)).sum()
    return sum_p, sum_p2, ent


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
def test_reference_matches_naive_float64(bs, g):
    pool, queries, qpos = make_case(bs, g, torch.float32, seed=bs + g)
    scale = 0.3
    max_len = pool["block_tables"].shape[1] * bs
    got = call(K.attention_stats_ref, pool, queries, qpos, scale)
    exp = naive(pool, queries, qpos, scale, max_len)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=1e-5)
    # probabilities of each query that sees something sum to one
    n_seeing = sum(
        int((row_keys(pool, row)[1] <= int(qpos[row // 2, wi])).any()) * g
        for row in range(pool["block_tables"].shape[0]) for wi in range(queries.shape[1])
    )
    assert abs(float(got.sum_p.sum()) - n_seeing) < 1e-3


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("bs, g, dtype", grid(
    bs=[16, 32], g=[1, 3, 4, 8], dtype=[torch.float32, torch.float16, torch.bfloat16]))
def test_triton_matches_reference(bs, g, dtype):
    pool, queries, qpos = make_case(bs, g, dtype, seed=7 * bs + g)
    scale = 1.0 / math.sqrt(queries.shape[-1])
    got = call(K.attention_stats, pool, queries, qpos, scale)
    exp = call(K.attention_stats_ref, pool, queries, qpos, scale)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("sum_p", "sum_p2", "entropy"), got, exp):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, atol=atol * max(1.0, float(b.abs().max())), rtol=rtol, msg=name)
    # nothing past a head's length
    lens = pool["seq_lens"].long()
    idx = torch.arange(got.sum_p.shape[1], device=lens.device)
    assert float(got.sum_p[idx[None, :] >= lens[:, None]].abs().sum()) == 0.0


def older_than(qpos):
    """Per request, a threshold inside its window's positions (CAKE's use:
    entropy over the keys before the window)."""
    return qpos.clamp(min=0).amin(dim=1) + 3


@pytest.mark.parametrize("g", [1, 4])
def test_reference_entropy_before_matches_naive(g):
    pool, queries, qpos = make_case(16, g, torch.float32, seed=5 + g)
    before = older_than(qpos)
    max_len = pool["block_tables"].shape[1] * 16
    got = call(K.attention_stats_ref, pool, queries, qpos, 0.3, entropy_before=before)
    exp = naive(pool, queries, qpos, 0.3, max_len, entropy_before=before)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=1e-5)
    full = call(K.attention_stats_ref, pool, queries, qpos, 0.3)
    assert bool((got.entropy < full.entropy - 1e-4).any())  # the threshold bites


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_entropy_before_matches_reference(dtype):
    pool, queries, qpos = make_case(16, 4, dtype, seed=13)
    before = older_than(qpos)
    got = call(K.attention_stats, pool, queries, qpos, 0.2, entropy_before=before)
    exp = call(K.attention_stats_ref, pool, queries, qpos, 0.2, entropy_before=before)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=atol * max(1.0, float(b.abs().max())), rtol=rtol)


@pytest.mark.skipif(not _READY, reason=_WHY)
def test_triton_odd_head_dim_and_max_len():
    """Non-power-of-two head dim, larger window, an explicit output width."""
    pool, queries, qpos = make_case(16, 4, torch.float32, d=40, w=9, seed=3)
    max_len = int(pool["seq_lens"].max()) + 3
    got = call(K.attention_stats, pool, queries, qpos, 0.2, max_len=max_len)
    exp = call(K.attention_stats_ref, pool, queries, qpos, 0.2, max_len=max_len)
    assert got.sum_p.shape[1] == max_len
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_many_tiles_splits_and_chunks(dtype, monkeypatch):
    """Tiny tiles force several query tiles, key splits (pass 1) and key chunks (pass 2)."""
    import importlib

    mod = importlib.import_module("vllm_kvcompress_kernels.attention_stats")
    monkeypatch.setitem(mod.TUNING, "max_block_q", 16)
    monkeypatch.setitem(mod.TUNING, "block_n", 16)
    monkeypatch.setitem(mod.TUNING, "programs_per_sm", 64)
    monkeypatch.setitem(mod.TUNING, "min_split", 16)
    pool, queries, qpos = make_case(16, 3, dtype, w=7, seed=9)  # 21 queries -> 2 tiles
    got = call(K.attention_stats, pool, queries, qpos, 0.2)
    exp = call(K.attention_stats_ref, pool, queries, qpos, 0.2)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=atol * max(1.0, float(b.abs().max())), rtol=rtol)
