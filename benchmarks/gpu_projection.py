"""Projected end-to-end throughput of KV compression on one GPU, from kernel
timings measured on an H100 (docs/kernels.md) and a simple batch model.

This is arithmetic, not a measurement: no engine has run on a GPU yet (see
docs/gpu.md). Every assumption is a named constant below; change one and the
table follows. Workload as in the KV-Compress paper's throughput figure:
Llama-3.1-8B (bf16), 6000-token prompts, 500 new tokens, vLLM's default
settings (gpu_memory_utilization 0.9, the LLM class's max_num_seqs and
max_num_batched_tokens for the card) on an H100 80GB, or on an L4 to set the
model beside the paper's own L4 figure.

Model: every request costs its prefill (GEMM FLOPs + causal attention FLOPs
at an effective tensor-core rate), one compression (statistics + planning +
compaction, scaled from the measured kernels) and its share of the decode
steps. A decode step at batch B reads the weights once (or is bound by the
GEMM FLOPs of B tokens, whichever is longer), reads every resident KV once at
the paged-attention kernel's measured fraction of copy bandwidth, and pays a
fixed per-step overhead. The batch is the largest that fits the KV budget
(left after weights, activations and the requests being prefilled), capped by
max_num_seqs. Throughput = new tokens / GPU time per request.

    python benchmarks/gpu_projection.py [--prompt 6000] [--new 500] [--rates 1 8 32 64] [--gpu h100|l4]
"""

from __future__ import annotations

import argparse

GB = 1e9
# Per GPU. "measured": on an NVIDIA H100 80GB HBM3 (docs/kernels.md); the L4
# has no kernel measurements, so it borrows the H100's fractions of bandwidth
# and its kernel timings scaled by bandwidth (an assumption). Everything else
# is assumed: memory as the card reports it, effective bf16 rate about 60% of
# the dense peak, vLLM's defaults for max_num_seqs / max_num_batched_tokens.
GPUS = {
    "h100": {"memory": 79.6 * 2**30, "bandwidth": 3023 * GB,  # measured copy_
             "flops": 600e12, "max_num_seqs": 1024, "prefill_tokens": 16384,
             "reserve": 4 * GB},  # activations, CUDA graphs, sampler
    "l4": {"memory": 22.5 * 2**30, "bandwidth": 250 * GB,  # 300 GB/s peak
           "flops": 73e12, "max_num_seqs": 256, "prefill_tokens": 8192,
           "reserve": 2 * GB},
}
H100_BANDWIDTH = GPUS["h100"]["bandwidth"]
PAGED_ATTENTION_FRACTION = 0.87  # of copy bandwidth, decode at 32K tokens/head (measured)
STATS_SECONDS_PER_KEY_HEAD = 0.688e-3 / (4 * 8 * 32768)  # W=32, G=4 (measured, H100)
COMPACTION_SECONDS_PER_MOVE = 0.147e-3 / 262144  # (measured, H100)
MEMORY_UTILIZATION = 0.9  # vLLM's default
WEIGHT_READ_FRACTION = 0.85  # of copy bandwidth for the decode GEMMs' weight reads
STEP_OVERHEAD = {"stock": 2e-3, "plugin": 3e-3}  # s per decode step: scheduling,
# sampling, launches; the plugin runs attention eagerly between graph pieces
STOCK_ATTENTION_FRACTION = 0.90  # stock FlashAttention on dense pages (assumed)
PLANNING_SECONDS = 0.3e-3  # device sort/top-k of one request's scores (assumed, H100)
# --- model: Llama-3.1-8B ---
PARAMS = 8.03e9
LAYERS, KV_HEADS, QUERY_HEADS, HEAD_DIM, DTYPE_BYTES = 32, 8, 32, 128, 2
KV_BYTES_PER_TOKEN = LAYERS * KV_HEADS * HEAD_DIM * 2 * DTYPE_BYTES
# The KV-Compress paper's best multipliers over vLLM on one NVIDIA L4, same workload.
PAPER_L4 = {1: 1.38, 2: 2.00, 4: 2.54, 8: 3.44, 16: 3.90, 32: 4.93, 64: 5.18}


def prefill_seconds(gpu: dict, prompt: int) -> float:
    gemm = 2 * PARAMS * prompt
    attention = 2 * 2 * LAYERS * QUERY_HEADS * HEAD_DIM * prompt * prompt / 2  # causal
    return (gemm + attention) / gpu["flops"]


def compression_seconds(gpu: dict, prompt: int, rate: float) -> float:
    if rate == 1:
        return 0.0
    key_heads = prompt * LAYERS * KV_HEADS
    moves = key_heads * min(1 / rate, 1 - 1 / rate)  # kept KVs beyond the new end
    h100 = (key_heads * STATS_SECONDS_PER_KEY_HEAD + PLANNING_SECONDS
            + moves * COMPACTION_SECONDS_PER_MOVE)
    return h100 * H100_BANDWIDTH / gpu["bandwidth"]


def project(gpu: dict, prompt: int, new: int, rate: float, engine: str) -> dict:
    """One row of the table for ``engine`` ("stock" vLLM or the "plugin")."""
    weights = PARAMS * DTYPE_BYTES
    budget = gpu["memory"] * MEMORY_UTILIZATION - weights - gpu["reserve"]
    # Requests mid-prefill hold, on average, half of their prompt uncompressed.
    in_prefill = -(-gpu["prefill_tokens"] // prompt)
    budget -= in_prefill * prompt / 2 * KV_BYTES_PER_TOKEN
    # Prompt KVs are compressed once after prefill; new tokens add up.
    resident = prompt / rate + new / 2  # tokens, averaged over the decode
    batch = min(gpu["max_num_seqs"], int(budget // (resident * KV_BYTES_PER_TOKEN)))
    if batch < 1:
        raise SystemExit(f"the model's KV budget ({budget / GB:.1f} GB) holds no request")
    attention_fraction = (STOCK_ATTENTION_FRACTION if engine == "stock"
                          else PAGED_ATTENTION_FRACTION)
    bandwidth = gpu["bandwidth"]
    step = (max(weights / (WEIGHT_READ_FRACTION * bandwidth), 2 * PARAMS * batch / gpu["flops"])
            + batch * resident * KV_BYTES_PER_TOKEN / (attention_fraction * bandwidth)
            + STEP_OVERHEAD[engine])
    prefill = prefill_seconds(gpu, prompt)
    per_request = prefill + compression_seconds(gpu, prompt, rate) + new * step / batch
    return {"rate": rate, "resident": resident, "batch": batch, "step_ms": step * 1e3,
            "tokens_per_s": new / per_request, "prefill_share": prefill / per_request}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=6000)
    parser.add_argument("--new", type=int, default=500)
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    args = parser.parse_args()
    gpu = GPUS[args.gpu]
    stock = project(gpu, args.prompt, args.new, 1, "stock")
    total = (args.prompt + args.new) / args.new  # the paper counts prompt tokens too
    print(f"stock vLLM: batch {stock['batch']}, step {stock['step_ms']:.1f} ms, "
          f"{stock['tokens_per_s']:.0f} new tokens/s, "
          f"{stock['tokens_per_s'] * total:.0f} total tokens/s\n")
    print("| rate | resident tokens / request | batch | decode step ms | new tokens/s "
          "| total tokens/s | vs stock vLLM | prefill share of GPU time | paper, L4 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for rate in args.rates:
        row = project(gpu, args.prompt, args.new, rate, "plugin")
        paper = PAPER_L4.get(int(rate))
        print(f"| {rate:g} | {row['resident']:.0f} | {row['batch']} | {row['step_ms']:.1f} "
              f"| {row['tokens_per_s']:.0f} | {row['tokens_per_s'] * total:.0f} "
              f"| {row['tokens_per_s'] / stock['tokens_per_s']:.2f}x "
              f"| {row['prefill_share']:.0%} | {f'{paper:.2f}x' if paper else '-'} |")


if __name__ == "__main__":
    main()
