"""Per-head paged attention: Triton kernel vs torch reference vs a naive float64 loop.

Tolerances on the output (same dtype as the query): fp32 atol/rtol 1e-5/1e-4;
fp16 2e-3/2e-3; bf16 2e-2/2e-2 (on GPU the probabilities are rounded to the
value dtype before the P@V tensor-core product, and the output itself is
rounded to fp16/bf16).
"""

from __future__ import annotations

import math

import pytest
import torch

import vllm_kvcompress_kernels as K
from param_grid import grid
from vllm_kvcompress_kernels.testing import DEVICE, make_pool, row_keys, triton_ready

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
_READY, _WHY = triton_ready()
H = 2


def make_case(bs, g, dtype, chunks, d=32, seed=0):
    """Requests with the given chunk lengths; each head holds the chunk plus a history
    whose length differs per head (empty, odd, exact block multiples)."""
    gen = torch.Generator().manual_seed(seed)
    extra = [0, 2 * bs, bs + 3, 2 * bs - 1, 1, 3 * bs]
    lens = []
    for r, c in enumerate(chunks):
        for h in range(H):
            lens.append(c + extra[(r * H + h) % len(extra)])
    pool = make_pool(lens, bs, d, dtype, seed=seed)
    qsl = [0]
    for c in chunks:
        qsl.append(qsl[-1] + c)
    query = torch.randn(qsl[-1], H * g, d, generator=gen).to(dtype).to(DEVICE)
    return pool, query, torch.tensor(qsl, dtype=torch.int32, device=DEVICE)


def call(fn, pool, query, qsl, scale, **kw):
    kc, vc = pool["kv"][0, :, :, 0, :], pool["kv"][1, :, :, 0, :]
    return fn(query, kc, vc, pool["block_tables"], pool["seq_lens"], qsl, scale, **kw)


def naive(pool, query, qsl, scale):
    t, hq, d = query.shape
    r = qsl.numel() - 1
    g = hq // H
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for req in range(r):
        q0, q1 = int(qsl[req]), int(qsl[req + 1])
        c = q1 - q0
        for h in range(H):
            row = req * H + h
            k, _ = row_keys(pool, row, 0)
            v, _ = row_keys(pool, row, 1)
            k, v = k.cpu().double(), v.cpu().double()
            n = k.shape[0]
            for i in range(c):
                see = n - c + i + 1
                if see <= 0:
                    continue
                for gi in range(g):
                    q = query[q0 + i, h * g + gi].cpu().double()
                    p = torch.softmax((k[:see] @ q) * scale, dim=0)
                    out[q0 + i, h * g + gi] = p @ v[:see]
    return out


CASES = {"decode": [1, 1, 1], "prefill": [3, 1, 0, 5]}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
def test_reference_matches_naive_float64(kind, bs, g):
    pool, query, qsl = make_case(bs, g, torch.float32, CASES[kind], seed=bs + g)
    got = call(K.paged_attention_ref, pool, query, qsl, 0.25)
    torch.testing.assert_close(got.cpu().double(), naive(pool, query, qsl, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("kind, bs, g, dtype", grid(
    kind=list(CASES), bs=[16, 32], g=[1, 3, 4, 8],
    dtype=[torch.float32, torch.float16, torch.bfloat16]))
def test_triton_matches_reference(kind, bs, g, dtype):
    pool, query, qsl = make_case(bs, g, dtype, CASES[kind], seed=11 * bs + g)
    scale = 1.0 / math.sqrt(query.shape[-1])
    exp = call(K.paged_attention_ref, pool, query, qsl, scale)
    atol, rtol = TOL[dtype]
    for splits in (1, 3):  # single pass, and split keys + merge kernel
        got = call(K.paged_attention, pool, query, qsl, scale, num_splits=splits)
        assert got.dtype == dtype
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol, msg=f"num_splits={splits}")


@pytest.mark.skipif(not _READY, reason=_WHY)
def test_triton_auto_splits_out_buffer_and_odd_head_dim():
    pool, query, qsl = make_case(16, 4, torch.float32, [2, 1, 7], d=40, seed=5)
    exp = call(K.paged_attention_ref, pool, query, qsl, 0.3)
    out = torch.full_like(query, float("nan"))
    got = call(K.paged_attention, pool, query, qsl, 0.3, out=out, max_seq_len=int(pool["seq_lens"].max()))
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
