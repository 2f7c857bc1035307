"""kvzip's whole reconstruction pass against the chunked prefill of the same
context, on the device, through a Llama-8B-shaped stack of layers.

The GPU machines have no vLLM, so the model is a stand-in with the shapes of
Llama-3.1-8B (random bf16 weights, RMSNorm, no RoPE: it times, it does not
answer): per layer the QKV, output and gated MLP matmuls and the attention.
- prefill: the context in chunks of ``--chunk`` tokens, each attending to the
  KVs before it and to itself (torch SDPA, flash, causal), its KVs appended;
- kvzip pass: the same chunks again, each behind a 40-token instruction, with
  the reconstruction kernels (``kernels/reconstruction.py``) against all the
  context's KVs, nothing appended; every layer's scores maxed into a buffer.
Wall seconds with the device synchronised, and their ratio.

    python benchmarks/kernels/bench_kvzip_pass.py [--context 32768] [--chunk 512] [--layers 32]
    python benchmarks/kernels/bench_kvzip_pass.py --smoke   # CPU, tiny, interpreter
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
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import import_kernels, wall_times  # noqa: E402

kernels = import_kernels()
INSTRUCTION_TOKENS = 40


class Layer:
    """One decoder layer's weights: hidden size E, H KV heads of G queries."""

    def __init__(self, e, h, g, d, mlp, device, dtype):
        def weight(rows, cols):
            return (torch.randn(rows, cols, device=device) / rows ** 0.5).to(dtype)
        self.shape = (h, g, d)
        self.qkv = weight(e, (h * g + 2 * h) * d)
        self.out = weight(h * g * d, e)
        self.gate_up = weight(e, 2 * mlp)
        self.down = weight(mlp, e)

    def project(self, x):
        h, g, d = self.shape
        qkv = F.rms_norm(x, (x.shape[-1],)) @ self.qkv
        q, k, v = qkv.split([h * g * d, h * d, h * d], -1)
        t = x.shape[0]
        return q.view(t, h, g, d), k.view(t, h, d), v.view(t, h, d)

    def finish(self, x, attended):
        x = x + attended.reshape(x.shape[0], -1) @ self.out
        gate, up = (F.rms_norm(x, (x.shape[-1],)) @ self.gate_up).chunk(2, -1)
        return x + (F.silu(gate) * up) @ self.down


def prefill(layers, context, chunk, cache):
    """Chunked prefill into ``cache`` [L] of (K, V) [H, G, N, D]: each KV is
    stored once per query head of its group, so SDPA's flash kernel reads it
    without a per-call repeat (the pass reads the first copy)."""
    for start in range(0, context.shape[0], chunk):
        x = context[start:start + chunk]
        t = x.shape[0]
        seen = start + t
        for index, layer in enumerate(layers):
            h, g, d = layer.shape
            q, k, v = layer.project(x)
            keys, values = cache[index]
            keys[:, :, start:seen] = k.transpose(0, 1)[:, None]
            values[:, :, start:seen] = v.transpose(0, 1)[:, None]
            query = q.permute(1, 2, 0, 3).reshape(1, h * g, t, d)
            attended = F.scaled_dot_product_attention(
                query, keys.view(1, h * g, -1, d)[:, :, :seen],
                values.view(1, h * g, -1, d)[:, :, :seen], attn_mask=causal_lower_right(t, seen))
            x = layer.finish(x, attended[0].view(h, g, t, d).permute(2, 0, 1, 3))


def kvzip_pass(layers, context, chunk, cache, instruction):
    """The reconstruction pass over the whole context; its scores [L, H, N]."""
    h = layers[0].shape[0]
    n = context.shape[0]
    scores = torch.zeros(len(layers), h, n, device=context.device)
    lens = torch.full((h,), n, dtype=torch.int32, device=context.device)
    for start in range(0, n, chunk):
        x = torch.cat([instruction, context[start:start + chunk]])
        for index, layer in enumerate(layers):
            q, k, v = layer.project(x)
            keys, values = cache[index]
            attended, best = kernels.reconstruction_attention(
                q, k, v, keys[:, 0], values[:, 0], lens, layer.shape[2] ** -0.5)
            torch.maximum(scores[index], best, out=scores[index])
            x = layer.finish(x, attended)
    return scores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype, contexts, chunk, runs = torch.device("cpu"), torch.float32, [48], 16, 1
        e, h, g, d, mlp, n_layers = 64, 2, 2, 16, 128, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kvzip_pass needs CUDA (or --smoke for a CPU check)")
        device, dtype, contexts, chunk, runs = (torch.device("cuda"), torch.bfloat16,
                                                args.context, args.chunk, args.runs)
        e, h, g, d, mlp, n_layers = 4096, 8, 4, 128, 14336, args.layers
    torch.manual_seed(0)
    layers = [Layer(e, h, g, d, mlp, device, dtype) for _ in range(n_layers)]
    rows = []
    for n in contexts:
        context = torch.randn(n, e, device=device).to(dtype)
        instruction = torch.randn(INSTRUCTION_TOKENS if not args.smoke else 4, e,
                                  device=device).to(dtype)
        cache = [(torch.zeros(h, g, n, d, device=device, dtype=dtype),
                  torch.zeros(h, g, n, d, device=device, dtype=dtype)) for _ in layers]
        prefill_s = min(wall_times(lambda: prefill(layers, context, chunk, cache),
                                   device, runs))
        result = {}
        pass_s = min(wall_times(lambda: result.update(
            scores=kvzip_pass(layers, context, chunk, cache, instruction)), device, runs))
        rows.append({"context": n, "chunk": chunk, "prefill_s": prefill_s,
                     "kvzip_pass_s": pass_s, "pass_over_prefill": pass_s / prefill_s,
                     "share_of_kvs_scored": (result["scores"] > 0).float().mean().item()})
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "layers": n_layers, "rows": rows}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
