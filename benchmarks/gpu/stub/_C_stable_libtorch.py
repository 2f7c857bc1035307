"""Pure-torch stand-in for vLLM's compiled CUDA module ``vllm._C_stable_libtorch``.

The lent GPU machine cannot carry vLLM's compiled extensions (hundreds of MB),
so the carried source tree gets this file under that name. Importing it
defines the ``torch.ops._C`` operators a dense Llama-style model can reach:

- real (plain torch, any device): the ops vLLM's eager CUDA path calls for
  norms, activation, rotary embedding and repetition penalties;
- capability queries: every CUTLASS kernel is reported missing, so vLLM's
  quantization code never picks one;
- placeholders: operators that vLLM's compile passes only *name* at import
  time (fusion patterns, functionalization fixes); calling one raises.

vLLM's default compiled mode (custom ops off, native RMSNorm) reaches none of
these at run time; the eager fallback and sampling with penalties do.
"""

from __future__ import annotations

import torch

NAMESPACE = "_C"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def _rms_normalize(x32: torch.Tensor, weight: torch.Tensor | None, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm of a float32 tensor; scaled in the weight's dtype, returned in
    ``dtype`` (the rounding steps of vLLM's native version)."""
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        return (x32.to(weight.dtype) * weight).to(dtype)
    return x32.to(dtype)


def rms_norm(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor | None,
             epsilon: float) -> None:
    result.copy_(_rms_normalize(input.float(), weight, epsilon, input.dtype))


def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor,
                       weight: torch.Tensor | None, epsilon: float) -> None:
    """``residual += input`` (summed in float32), then ``input = norm(residual)``."""
    summed = input.float() + residual.float()
    residual.copy_(summed.to(residual.dtype))
    input.copy_(_rms_normalize(summed, weight, epsilon, input.dtype))


def silu_and_mul(result: torch.Tensor, input: torch.Tensor) -> None:
    gate, up = input.chunk(2, dim=-1)
    result.copy_(torch.nn.functional.silu(gate) * up)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate ``x`` [T, H, R] by per-token angles (cos/sin [T, 1, R/2])."""
    if neox:
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool,
                     rope_dim_offset: int = 0, inverse: bool = False) -> None:
    """In place on ``query``/``key`` ([T, H*D] or [T, H, D]); the rotated
    dims are ``[offset, offset + rot_dim)`` of each head, where ``rot_dim``
    is the cache's width (cos then sin halves)."""
    flat = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, flat).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
    rot_dim = cos_sin_cache.shape[-1]
    lo, hi = rope_dim_offset, rope_dim_offset + rot_dim
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(flat.numel(), -1, head_size)
        part = heads[..., lo:hi]
        # In the tensor's own dtype, as vLLM's native rotary embedding does.
        part.copy_(_rotate(part, cos.to(x.dtype), sin.to(x.dtype), is_neox))


def apply_repetition_penalties_(logits: torch.Tensor, prompt_mask: torch.Tensor,
                                output_mask: torch.Tensor,
                                repetition_penalties: torch.Tensor) -> None:
    """Tokens seen in the prompt or output: positive logits scaled by
    1/penalty, negative ones by the penalty (the factor is rounded in the
    penalties' dtype first, as vLLM's native version does)."""
    penalty = torch.where(prompt_mask | output_mask,
                          repetition_penalties.unsqueeze(1), 1.0)
    logits.mul_(torch.where(logits > 0, 1.0 / penalty, penalty))


REAL_OPS = {
    "rms_norm": ("(Tensor(a!) result, Tensor input, Tensor? weight, float epsilon) -> ()",
                 rms_norm),
    "fused_add_rms_norm": ("(Tensor(a!) input, Tensor(b!) residual, Tensor? weight, "
                           "float epsilon) -> ()", fused_add_rms_norm),
    "silu_and_mul": ("(Tensor(a!) result, Tensor input) -> ()", silu_and_mul),
    "rotary_embedding": ("(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
                         "int head_size, Tensor cos_sin_cache, bool is_neox, "
                         "int rope_dim_offset=0, bool inverse=False) -> ()",
                         rotary_embedding),
    "apply_repetition_penalties_": ("(Tensor(a!) logits, Tensor prompt_mask, "
                                    "Tensor output_mask, Tensor repetition_penalties) -> ()",
                                    apply_repetition_penalties_),
}

# "Is this CUTLASS kernel built for capability X?": never, here.
CAPABILITY_QUERIES = (
    "cutlass_scaled_mm_supports_fp8",
    "cutlass_scaled_mm_supports_block_fp8",
    "cutlass_scaled_mm_supports_fp4",
    "cutlass_group_gemm_supported",
    "mxfp4_experts_quant_supported",
)

# Read as ``torch.ops._C.<name>.default`` when vLLM's compile passes are
# imported on CUDA; only pattern tables and identity checks use them.
PLACEHOLDERS = (
    "static_scaled_fp8_quant",
    "dynamic_scaled_fp8_quant",
    "dynamic_per_token_scaled_fp8_quant",
    "silu_and_mul_quant",
    "silu_and_mul_per_block_quant",
    "fused_qk_norm_rope",
    "rms_norm_static_fp8_quant",
    "fused_add_rms_norm_static_fp8_quant",
    "rms_norm_dynamic_per_token_quant",
)


def _placeholder(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(
            f"torch.ops._C.{name} is a placeholder of the GPU harness's stub for "
            "vLLM's compiled module: no pure-torch version exists (benchmarks/gpu)")

    return call


def _not_supported(cuda_device_capability: int) -> bool:
    return False


def _register() -> None:
    for name, (schema, fn) in REAL_OPS.items():
        _lib.define(name + schema)
        _lib.impl(name, fn, "CompositeExplicitAutograd")
    for name in CAPABILITY_QUERIES:
        _lib.define(name + "(int cuda_device_capability) -> bool")
        _lib.impl(name, _not_supported, "CompositeExplicitAutograd")
    for name in PLACEHOLDERS:
        _lib.define(name + "() -> ()")
        _lib.impl(name, _placeholder(name), "CompositeExplicitAutograd")


_register()
