"""Compaction and cache write: Triton vs torch reference vs explicit loops (exact copies)."""

from __future__ import annotations

import pytest
import torch

import vllm_kvcompress_kernels as K
from vllm_kvcompress_kernels.testing import DEVICE, clone_pool, make_pool, triton_ready

_READY, _WHY = triton_ready()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def views(pool):
    kv = pool["kv"]
    return kv[0, :, :, 0, :], kv[1, :, :, 0, :]


def random_moves(n_slots, m, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_slots, generator=gen)[: 2 * m]
    return torch.stack([perm[:m], perm[m:]], dim=1).to(torch.int64).to(DEVICE)


def assert_pools_equal(a, b):
    for k in ("kv", "kv_metric", "kv_position"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bs", [16, 32])
def test_compaction_reference_matches_loop(bs):
    pool = make_pool([bs + 3, 2 * bs, 0, 5], bs, 24, torch.float32, seed=bs)
    n_slots = pool["kv"].shape[1] * bs
    moves = random_moves(n_slots, 17, seed=1)
    want = clone_pool(pool)
    for src, dst in moves.tolist():
        sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        want["kv"][:, db, do] = want["kv"][:, sb, so]
        want["kv_metric"][db, do] = want["kv_metric"][sb, so]
        want["kv_position"][db, do] = want["kv_position"][sb, so]
    got = clone_pool(pool)
    kc, vc = views(got)
    K.compact_kv_ref(moves, kc, vc, got["kv_metric"], got["kv_position"])
    assert_pools_equal(got, want)


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("m", [0, 1, 37])
@pytest.mark.parametrize("with_meta", [True, False])
def test_compaction_triton_matches_reference(dtype, bs, m, with_meta):
    pool = make_pool([3 * bs + 1, 2 * bs, bs - 1], bs, 40, dtype, seed=m + bs)
    moves = random_moves(pool["kv"].shape[1] * bs, m, seed=m)
    a, b = clone_pool(pool), clone_pool(pool)
    for fn, p in ((K.compact_kv, a), (K.compact_kv_ref, b)):
        kc, vc = views(p)
        meta = (p["kv_metric"], p["kv_position"]) if with_meta else (None, None)
        fn(moves, kc, vc, *meta)
    assert_pools_equal(a, b)
    if not with_meta:
        assert torch.equal(a["kv_metric"], pool["kv_metric"])


def random_slot_mapping(t, h, n_slots, seed):
    gen = torch.Generator().manual_seed(seed)
    sm = torch.randperm(n_slots, generator=gen)[: t * h].reshape(t, h).to(torch.int64)
    sm[torch.rand(t, h, generator=gen) < 0.2] = -1
    return sm.to(DEVICE)


@pytest.mark.parametrize("bs", [16, 32])
def test_cache_write_reference_matches_loop(bs):
    pool = make_pool([bs, bs], bs, 24, torch.float32, seed=bs)
    t, h = 9, 3
    sm = random_slot_mapping(t, h, pool["kv"].shape[1] * bs, seed=2)
    key = torch.randn(t, h, 24, device=DEVICE)
    value = torch.randn(t, h, 24, device=DEVICE)
    pos = torch.arange(100, 100 + t, device=DEVICE)
    want = clone_pool(pool)
    for ti in range(t):
        for hi in range(h):
            s = int(sm[ti, hi])
            if s < 0:
                continue
            want["kv"][0, s // bs, s % bs, 0] = key[ti, hi]
            want["kv"][1, s // bs, s % bs, 0] = value[ti, hi]
            want["kv_metric"][s // bs, s % bs] = 0
            want["kv_position"][s // bs, s % bs] = 100 + ti
    got = clone_pool(pool)
    kc, vc = views(got)
    K.write_kv_cache_ref(key, value, sm, kc, vc, got["kv_metric"], got["kv_position"], pos)
    assert_pools_equal(got, want)


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("t", [0, 1, 13])
@pytest.mark.parametrize("with_meta", [True, False])
def test_cache_write_triton_matches_reference(dtype, bs, t, with_meta):
    h, d = 4, 40
    pool = make_pool([2 * bs, 3 * bs + 2], bs, d, dtype, seed=t + bs)
    sm = random_slot_mapping(t, h, pool["kv"].shape[1] * bs, seed=t)
    gen = torch.Generator().manual_seed(t)
    # fp32 activations written into a low-precision cache (cast inside the kernel),
    # given as a strided view of a fused [T, 2, H, D] tensor
    kvin = torch.randn(t, 2, h, d, generator=gen).to(DEVICE)
    key, value = kvin[:, 0], kvin[:, 1]
    pos = torch.arange(7, 7 + t, dtype=torch.int64, device=DEVICE)
    a, b = clone_pool(pool), clone_pool(pool)
    for fn, p in ((K.write_kv_cache, a), (K.write_kv_cache_ref, b)):
        kc, vc = views(p)
        meta = (p["kv_metric"], p["kv_position"], pos) if with_meta else (None, None, None)
        fn(key, value, sm, kc, vc, *meta)
    if dtype == torch.bfloat16 and K.interpret_mode():
        # Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to
        # nearest (GPU Triton and torch round): allow one bf16 ulp there.
        torch.testing.assert_close(a["kv"], b["kv"], atol=0.0, rtol=2.0**-7)
        a["kv"] = b["kv"]
    assert_pools_equal(a, b)
