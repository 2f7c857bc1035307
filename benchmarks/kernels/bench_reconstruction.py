"""KVzip's reconstruction attention (``compression/reconstruction.py``) on the
device: one layer's call for one reconstruction chunk against M held KVs.

It first checks output and scores against a dense float64 reference (a head
with padding, several tiles). Then it times, at Llama-8B-like shapes:
- the engine's call (float32, tiled with the device's default budget),
- the same call as one tile (the untiled form), with each one's peak scratch
  memory,
- the tiled call with TF32 matmuls (for information: not what the engine does),
- the attention of an ordinary prefill chunk of the same size (torch SDPA,
  bf16, causal over the M + T keys), as the yardstick of what the pass would
  cost if it needed no probabilities.

    python benchmarks/kernels/bench_reconstruction.py [--held 4096 16384 32768] [--chunk 512]
    python benchmarks/kernels/bench_reconstruction.py --smoke   # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import package_without_plugin  # noqa: E402

package_without_plugin()
from vllm_kvcompress.compression.reconstruction import (  # noqa: E402
    reconstruction_attention,
)


def dense_reference(query, key, value, held_keys, held_values, held, scale):
    """Float64, one softmax over the concatenated held and own keys."""
    t, h, g, d = query.shape
    m = held_keys.shape[1]
    q = query.double().permute(1, 2, 0, 3) * scale  # [H, G, T, D]
    keys = torch.cat([held_keys.double(), key.double().transpose(0, 1)], 1)  # [H, M+T, D]
    values = torch.cat([held_values.double(), value.double().transpose(0, 1)], 1)
    logits = torch.einsum("hgtd,hkd->hgtk", q, keys)
    visible = torch.ones(h, t, m + t, dtype=torch.bool, device=query.device)
    visible[:, :, :m] = held[:, None, :]
    visible[:, :, m:] = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
    probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    out = torch.einsum("hgtk,hkd->thgd", probs, values)
    return out, probs[..., :m].amax(dim=(1, 2))


def inputs(t, h, g, d, m, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    held = torch.ones(h, m, dtype=torch.bool, device=device)
    held[0, m // 3:] = False  # one shorter head
    return (rand(t, h, g, d) * 2, rand(t, h, d), rand(t, h, d), rand(h, m, d), rand(h, m, d),
            held)


def check(device, t=96, h=4, g=4, d=64, m=700) -> dict:
    """Max abs differences from the reference, tiled several ways."""
    args = inputs(t, h, g, d, m, device)
    ref_out, ref_best = dense_reference(*args, d ** -0.5)
    result = {}
    for name, tile in (("default_tile", None), ("small_tiles", h * g * (m + t) * 7)):
        out, best = reconstruction_attention(*args, d ** -0.5, tile_elements=tile)
        result[name] = {"out": (out.double() - ref_out).abs().max().item(),
                        "scores": (best.double() - ref_best).abs().max().item()}
        assert result[name]["out"] < 1e-4 and result[name]["scores"] < 1e-5, result
    return result


def elapsed_ms(fn, device, runs: int) -> float:
    """Median wall milliseconds with the device synchronised (one warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(runs + 1):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def peak_scratch_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(device, t, h, g, d, m, runs) -> dict:
    args = inputs(t, h, g, d, m, device, seed=m)
    scale = d ** -0.5
    args[-1].fill_(True)  # every head full, as after a prefill
    calls = {
        "tiled": lambda: reconstruction_attention(*args, scale),
        "one_tile": lambda: reconstruction_attention(*args, scale, tile_elements=1 << 62),
    }
    row = {"held": m, "chunk": t}
    for name, call in calls.items():
        row[f"{name}_ms"] = elapsed_ms(call, device, runs)
        row[f"{name}_scratch_mib"] = peak_scratch_mib(call, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        row["tiled_tf32_ms"] = elapsed_ms(calls["tiled"], device, runs)
        _, tf32_scores = calls["tiled"]()
        torch.backends.cuda.matmul.allow_tf32 = False
        _, scores = calls["tiled"]()
        row["tf32_max_score_diff"] = (tf32_scores - scores).abs().max().item()
        from torch.nn.attention.bias import causal_lower_right

        query, key, value, held_keys, held_values, _ = (x.bfloat16() for x in args)
        q = query.permute(1, 2, 0, 3).reshape(1, h * g, t, d)  # head-major, as below
        keys = torch.cat([held_keys, key.transpose(0, 1)], 1).repeat_interleave(g, 0)[None]
        values = torch.cat([held_values, value.transpose(0, 1)], 1).repeat_interleave(g, 0)[None]
        mask = causal_lower_right(t, m + t)  # the chunk's queries come last: flash applies
        row["sdpa_prefill_ms"] = elapsed_ms(lambda: F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=scale), device, runs)
        row["tiled_over_prefill"] = row["tiled_ms"] / row["sdpa_prefill_ms"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
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
              "rows": [measure(device, *shape, m, runs) for m in held]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
