"""KVzip's reconstruction attention: the Triton kernels against the torch
reference, and the reference against a per-query loop written from the
definition."""

from __future__ import annotations

import pytest
import torch

import vllm_kvcompress_kernels as K
from vllm_kvcompress_kernels.testing import DEVICE, triton_ready

_READY, _WHY = triton_ready()


def inputs(t, h, g, d, m, lens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    held_keys = rand(h, m, d)
    for head, n in enumerate(lens):
        held_keys[head, n:] = 1e4  # padding must not leak into any softmax
    return (rand(t, h, g, d) * 2, rand(t, h, d), rand(t, h, d), held_keys, rand(h, m, d),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def loop_reference(query, key, value, held_keys, held_values, held_lens, scale):
    t, h, g, d = query.shape
    out = torch.zeros(t, h, g, d, dtype=torch.float64)
    best = torch.zeros(h, held_keys.shape[1], dtype=torch.float64)
    for head in range(h):
        n = int(held_lens[head])
        keys = torch.cat([held_keys[head, :n], key[:, head]]).double().cpu()
        values = torch.cat([held_values[head, :n], value[:, head]]).double().cpu()
        for i in range(t):
            for j in range(g):
                probs = (keys[:n + i + 1] @ query[i, head, j].double().cpu() * scale).softmax(0)
                out[i, head, j] = probs @ values[:n + i + 1]
                best[head, :n] = torch.maximum(best[head, :n], probs[:n])
    return out, best


def test_reference_matches_the_definition():
    args = inputs(5, 3, 3, 8, 11, [11, 4, 0], torch.float32, seed=1)
    out, best = K.reconstruction_attention_ref(*args, scale=8 ** -0.5)
    want_out, want_best = loop_reference(*args, scale=8 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(best.double().cpu(), want_best, rtol=1e-4, atol=1e-6)


# Shapes: a group of 3 (rows mix positions across tiles), head size below the
# smallest tile, more rows and keys than one tile, an empty head, a chunk of 1.
CASES = [
    (40, 3, 3, 64, 150, [150, 77, 0]),
    (7, 2, 4, 8, 20, [20, 13]),
    (1, 1, 1, 32, 5, [5]),
    (70, 2, 2, 16, 0, [0, 0]),
]


@pytest.mark.skipif(not _READY, reason=_WHY)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("tuning", [None, {"block_r": 16, "block_n": 16}], ids=["default", "small"])
def test_triton_matches_reference(case, tuning):
    t, h, g, d, m, lens = case
    args = inputs(t, h, g, d, m, lens, torch.float32, seed=t + m)
    out, best = K.reconstruction_attention(*args, scale=d ** -0.5, tuning=tuning)
    want_out, want_best = K.reconstruction_attention_ref(*args, scale=d ** -0.5)
    assert out.shape == (t, h, g, d) and best.shape == (h, m)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(best, want_best, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 tensor-core dots need a GPU")
def test_triton_bf16_close_to_float32_reference():
    t, h, g, d, m, lens = 96, 4, 4, 128, 1000, [1000, 600, 999, 1]
    args = inputs(t, h, g, d, m, lens, torch.bfloat16, seed=5)
    out, best = K.reconstruction_attention(*args, scale=d ** -0.5)
    want_out, want_best = K.reconstruction_attention_ref(
        *(x.float() if x.is_floating_point() else x for x in args), scale=d ** -0.5)
    torch.testing.assert_close(out.float(), want_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(best, want_best, rtol=2e-2, atol=2e-3)
