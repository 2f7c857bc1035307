"""KVzip's reconstruction attention (``compression/reconstruction.py``) on the
device: one layer's call for one reconstruction chunk against M held KVs.

It first checks output and scores against a dense float64 reference (a head
with padding, several tiles). Then it times, at Llama-8B-like shapes:
- the torch call (float32, tiled with the device's default budget), which
  the CPU path uses,
- the same call as one tile (the untiled form), with each one's peak scratch
  memory,
- the tiled call with TF32 matmuls (for information: not what the engine does),
- the Triton kernels (bf16 inputs, as the engine's K/V), which the CUDA path
  uses,
- the attention of an ordinary prefill chunk of the same size (torch SDPA,
  bf16, causal over the M + T keys), as the yardstick of what the pass would
  cost if it needed no probabilities.

    python benchmarks/kernels/bench_reconstruction.py [--held 4096 16384 32768] [--chunk 512]
        [--tune]
    python benchmarks/kernels/bench_reconstruction.py --smoke   # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv[1:]:  # Triton reads this when the kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import import_kernels, package_without_plugin, wall_times  # noqa: E402

package_without_plugin()
kernels = import_kernels()
from vllm_kvcompress.compression.reconstruction import (  # noqa: E402
    reconstruction_attention,
)
from vllm_kvcompress_kernels import interpret_mode  # noqa: E402


def inputs(t, h, g, d, m, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    held_lens = torch.full((h,), m, dtype=torch.int32, device=device)
    held_lens[0] = m // 3  # one shorter head
    return (rand(t, h, g, d) * 2, rand(t, h, d), rand(t, h, d), rand(h, m, d), rand(h, m, d),
            held_lens)


def implementations(device) -> dict:
    """The engine's torch call and, where Triton runs, the kernels."""
    calls = {"torch": reconstruction_attention}
    if device.type == "cuda" or interpret_mode():
        calls["triton"] = kernels.reconstruction_attention
    return calls


def check(device, t=96, h=4, g=4, d=64, m=700) -> dict:
    """Max abs differences from the float64 reference: the torch call tiled
    two ways, and the kernels."""
    args = inputs(t, h, g, d, m, device)
    exact = [x.double() if x.is_floating_point() else x for x in args]
    ref_out, ref_best = kernels.reconstruction_attention_ref(*exact, d ** -0.5)
    calls = {"torch_small_tiles": lambda *a: reconstruction_attention(
        *a, tile_elements=h * g * (m + t) * 7)}
    calls.update(implementations(device))
    result = {}
    for name, call in calls.items():
        out, best = call(*args, d ** -0.5)
        result[name] = {"out": (out.double() - ref_out).abs().max().item(),
                        "scores": (best.double() - ref_best).abs().max().item()}
        assert result[name]["out"] < 1e-4 and result[name]["scores"] < 1e-5, result
    return result


def elapsed_ms(fn, device, runs: int) -> float:
    """Median wall milliseconds (the upper one of an even count) with the
    device synchronised (one warm-up)."""
    times = sorted(wall_times(fn, device, runs))
    return 1e3 * times[len(times) // 2]


def peak_scratch_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


TUNINGS = [{"block_r": r, "block_n": n, "num_warps": w}
           for r in (32, 64, 128) for n in (32, 64, 128) for w in (4, 8)]


def measure(device, t, h, g, d, m, runs, tune=False) -> dict:
    args = inputs(t, h, g, d, m, device, seed=m)
    scale = d ** -0.5
    args[-1].fill_(m)  # every head full, as after a prefill
    calls = {
        "tiled": lambda: reconstruction_attention(*args, scale),
        "one_tile": lambda: reconstruction_attention(*args, scale, tile_elements=1 << 62),
    }
    if "triton" in implementations(device):
        model_dtype = [x.bfloat16() if x.is_floating_point() and device.type == "cuda"
                       else x for x in args]  # the engine's K/V are in the model's dtype
        calls["triton"] = lambda: kernels.reconstruction_attention(*model_dtype, scale)
    row = {"held": m, "chunk": t}
    for name, call in calls.items():
        row[f"{name}_ms"] = elapsed_ms(call, device, runs)
        row[f"{name}_scratch_mib"] = peak_scratch_mib(call, device)
    if tune and "triton" in calls:
        timed = [(elapsed_ms(lambda: kernels.reconstruction_attention(
            *model_dtype, scale, tuning=tuning), device, runs), tuning) for tuning in TUNINGS]
        row["triton_tuned_ms"], row["triton_best_tuning"] = min(timed, key=lambda x: x[0])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        row["tiled_tf32_ms"] = elapsed_ms(calls["tiled"], device, runs)
        _, tf32_scores = calls["tiled"]()
        torch.backends.cuda.matmul.allow_tf32 = False
        _, scores = calls["tiled"]()
        row["tf32_max_score_diff"] = (tf32_scores - scores).abs().max().item()
        from torch.nn.attention.bias import causal_lower_right

        query, key, value, held_keys, held_values = (x.bfloat16() for x in args[:5])
        q = query.permute(1, 2, 0, 3).reshape(1, h * g, t, d)  # head-major, as below
        keys = torch.cat([held_keys, key.transpose(0, 1)], 1).repeat_interleave(g, 0)[None]
        values = torch.cat([held_values, value.transpose(0, 1)], 1).repeat_interleave(g, 0)[None]
        mask = causal_lower_right(t, m + t)  # the chunk's queries come last: flash applies
        row["sdpa_prefill_ms"] = elapsed_ms(lambda: F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale), device, runs)
        row["tiled_over_prefill"] = row["tiled_ms"] / row["sdpa_prefill_ms"]
        row["triton_over_prefill"] = row["triton_ms"] / row["sdpa_prefill_ms"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tune", action="store_true",
                        help="also time the kernels under each tuning of TUNINGS")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        device, shape, held, runs = torch.device("cpu"), (40, 2, 2, 16), [64], 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_reconstruction needs CUDA (or --smoke for a CPU check)")
        # Llama-3.1-8B: 8 KV heads, 4 query heads each, head size 128; the
        # chunk plus its instruction tokens.
        device, shape, held, runs = torch.device("cuda"), (args.chunk + 40, 8, 4, 128), \
            args.held, args.runs
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "check": check(device),
              "rows": [measure(device, *shape, m, runs, args.tune) for m in held]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
