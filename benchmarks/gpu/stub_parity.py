"""The stub's ``torch.ops._C`` ops against vLLM's own native (pure-torch)
versions on random inputs, float32 and bfloat16, called the way vLLM calls
them (through ``vllm._custom_ops`` where it has a wrapper). They match to
the last bit: the stub rounds where vLLM's native code rounds.

Runs inside ``cpu_probe``'s CUDA-looking Python (it imports the carried tree).
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.0}


class Errors:
    """The largest absolute error seen per check; fails past the tolerance."""

    def __init__(self):
        self.worst: dict[str, float] = {}

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
        err = (got.float() - want.float()).abs().max().item()
        self.worst[name] = max(self.worst.get(name, 0.0), err)
        assert err <= tol, f"{name}: max error {err} > {tol}"


def norms(errors: Errors, gen, dtype) -> None:
    from vllm import _custom_ops as ops
    from vllm import ir

    tol = TOLERANCE[dtype]
    x, res = (torch.randn(7, 256, generator=gen).to(dtype) for _ in range(2))
    w = (torch.rand(256, generator=gen) + 0.5).to(dtype)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-5)
    errors.close(f"rms_norm/{dtype}", out,
                 ir.ops.rms_norm.impls["native"].impl_fn(x, w, 1e-5), tol)
    want_x, want_res = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x, res, w, 1e-5)
    got_x, got_res = x.clone(), res.clone()
    ops.fused_add_rms_norm(got_x, got_res, w, 1e-5)
    errors.close(f"fused_add_rms_norm/{dtype}", got_x, want_x, tol)
    errors.close(f"fused_add_rms_norm.residual/{dtype}", got_res, want_res, 0.0)


def activation(errors: Errors, gen, dtype) -> None:
    from vllm.model_executor.layers.activation import SiluAndMul

    gate_up = torch.randn(5, 2 * 96, generator=gen).to(dtype)
    out = torch.empty(5, 96, dtype=dtype)
    torch.ops._C.silu_and_mul(out, gate_up)
    errors.close(f"silu_and_mul/{dtype}", out, SiluAndMul.forward_native(gate_up),
                 TOLERANCE[dtype])


def rotary(errors: Errors, gen, dtype) -> None:
    """Neox and GPT-J styles, with and without a key; in float32 also the
    inverse (undoes the rotation) and an offset (rotates a later window)."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    tol, heads, head_size, rot, tokens = TOLERANCE[dtype], 4, 64, 32, 6
    native = RotaryEmbedding.forward_static
    for neox in (True, False):
        angles = torch.arange(50.0)[:, None] * torch.rand(rot // 2, generator=gen)
        cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)
        pos = torch.randint(0, 50, (tokens,), generator=gen)
        q = torch.randn(tokens, heads * head_size, generator=gen).to(dtype)
        k = torch.randn(tokens, 2 * head_size, generator=gen).to(dtype)
        want_q, want_k = native(pos, q, k, head_size, rot, cache, neox)
        got_q, got_k = q.clone(), k.clone()
        ops.rotary_embedding(pos, got_q, got_k, head_size, cache, neox)
        errors.close(f"rotary_embedding/{dtype}", got_q, want_q, tol)
        errors.close(f"rotary_embedding.key/{dtype}", got_k, want_k, tol)
        only_q = q.clone()
        ops.rotary_embedding(pos, only_q, None, head_size, cache, neox)
        errors.close(f"rotary_embedding.no_key/{dtype}", only_q, want_q, tol)
        if dtype != torch.float32:
            continue
        ops.rotary_embedding(pos, only_q, None, head_size, cache, neox, 0, True)
        errors.close("rotary_embedding.inverse", only_q, q, 1e-5)
        shifted = q.clone()
        ops.rotary_embedding(pos, shifted, None, head_size, cache, neox, 16)

        def window(t):
            return t.view(tokens, heads, head_size)[..., 16:16 + rot].reshape(tokens, -1)

        want, _ = native(pos, window(q), None, rot, rot, cache, neox)
        errors.close("rotary_embedding.offset", window(shifted), want, 1e-5)


def penalties(errors: Errors, gen, dtype) -> None:
    from vllm import _custom_ops as ops

    logits = torch.randn(3, 40, generator=gen).to(dtype)
    prompt, output = (torch.rand(3, 40, generator=gen) < 0.3 for _ in range(2))
    factors = torch.tensor([1.0, 1.3, 2.0], dtype=dtype)
    want, got = logits.clone(), logits.clone()
    ops.apply_repetition_penalties_torch(want, prompt, output, factors)
    torch.ops._C.apply_repetition_penalties_(got, prompt, output, factors)
    errors.close(f"apply_repetition_penalties_/{dtype}", got, want, TOLERANCE[dtype])


def check_all() -> dict:
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(0)
    errors = Errors()
    for dtype in TOLERANCE:
        for check in (norms, activation, rotary, penalties):
            check(errors, gen, dtype)
    assert ops.cutlass_scaled_mm_supports_fp8(90) is False
    assert ops.cutlass_scaled_mm_supports_block_fp8(90) is False
    assert ops.cutlass_group_gemm_supported(90) is False
    return {"max_abs_error": errors.worst}
