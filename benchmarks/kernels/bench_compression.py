"""One compression of a long request through the engine's own ``Compressor``
with the Triton ops (window statistics kernel, torch planning on the device,
compaction kernel), as a share of one decode step's attention at batch 64.

The CUDA path's compression, end to end, outside vLLM: the GPU machines have
torch and Triton but no vLLM, so the package is imported without its plugin
hook. Wall-clock milliseconds with the device synchronised, host work included
(the planner reads a few sizes back to the host), median of a few runs; the
decode step is the paged attention of every layer (no GEMMs). Also a step
that compresses ``--step-requests`` requests of ``--step-tokens``: all
together (``Compressor.compress_step``) against one at a time.

    python benchmarks/kernels/bench_compression.py [--tokens 32768] [--batch 64]
        [--decode-tokens 4096] [--rate 8] [--step-requests 8] [--step-tokens 4096]
    python benchmarks/kernels/bench_compression.py --smoke   # CPU, tiny, interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path


def import_engine_parts():
    """``vllm_kvcompress``'s compression modules and kernels, without vLLM."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_utils import import_kernels, package_without_plugin

    package_without_plugin()
    import_kernels()
    from vllm_kvcompress.attention.ops.triton import TritonOps
    from vllm_kvcompress.attention.pool_view import HeadBlockCache
    from vllm_kvcompress.compression.compressor import CompressionJob, Compressor
    from vllm_kvcompress.compression.window_metric import ObservationWindow, RequestKVs
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.head_table import HeadTable
    from vllm_kvcompress.protocol import CompressOrder

    return types.SimpleNamespace(**locals())


def wall_ms(fn, sync, runs: int, setup=None) -> float:
    times = []
    for _ in range(runs + 1):  # the first run warms up
        if setup is not None:
            setup()
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[1:])


def held_requests(parts, shape: dict, count: int, tokens: int, device, dtype):
    """A pool of ``count`` requests in which every (layer, head) holds
    ``tokens`` KVs in shuffled head-blocks, and the engine's Compressor over
    it with the Triton ops. Returns the compressor, a function that gives
    fresh tables (and zeroes the metric), and each request's window."""
    import numpy as np
    import torch

    L, H, G, D, bs = (shape[k] for k in ("layers", "kv_heads", "group", "head_dim", "block"))
    W = shape["window"]
    ops = parts.TritonOps()
    per_head = -(-tokens // bs)
    per_request = L * H * per_head
    blocks = count * per_request
    buffer = torch.randn(blocks * bs * 2 * D, device=device).to(dtype)
    pool = parts.HeadBlockCache(buffer, blocks, bs, D, dtype)
    kv_metric = torch.zeros(blocks, bs, device=device)
    kv_position = (torch.arange(per_head * bs, device=device, dtype=torch.int32)
                   .view(per_head, bs).repeat(count * L * H, 1))
    ids = torch.randperm(blocks).numpy().astype("int32")
    kv_position[torch.from_numpy(ids).long().to(device)] = kv_position.clone()
    compressor = parts.Compressor(
        pool, kv_metric, kv_position, "row_major", 1 / math.sqrt(D),
        move_slots=ops.move_slots, window_statistics=ops.window_statistics)
    windows = [parts.ObservationWindow(torch.randn(L, W, H * G, D, device=device).to(dtype),
                                       torch.arange(tokens - W, tokens, device=device))
               for _ in range(count)]

    def fresh_tables():
        kv_metric.zero_()
        tables = []
        for index in range(count):
            table = parts.HeadTable(L, H, bs)
            table.append_blocks(np.full((L, H), per_head),
                                ids[index * per_request: (index + 1) * per_request])
            table.lens[:] = tokens
            tables.append(table)
        return tables

    return compressor, fresh_tables, windows


def run(shape: dict, device, dtype, runs: int) -> dict:
    import torch

    parts = import_engine_parts()
    L, H, G, D, bs = (shape[k] for k in ("layers", "kv_heads", "group", "head_dim", "block"))
    T = shape["tokens"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scale = 1 / math.sqrt(D)

    def order(tokens):
        return parts.CompressOrder(
            parts.KVCompressConfig(rate=shape["rate"], policy="kvcompress"),
            num_tokens=tokens, after_prompt=True, target_tokens=tokens)

    # One long request.
    compressor, fresh_tables, [window] = held_requests(parts, shape, 1, T, device, dtype)
    tables, evicted = {}, {}

    def compress():
        evicted["n"] = compressor.compress(tables["now"], window, order(T))

    compress_ms = wall_ms(compress, sync, runs,
                          setup=lambda: tables.update(now=fresh_tables()[0]))
    request = parts.RequestKVs.of(fresh_tables()[0], device)
    stats_ms = wall_ms(lambda: compressor.window_metric.kernel_statistics(
        [(request, window)], per_group=False), sync, runs)

    # A step that compresses several shorter requests: together (one
    # statistics and one compaction call) and one at a time.
    count, tokens = shape["step_requests"], shape["step_tokens"]
    step, fresh_step, windows = held_requests(parts, shape, count, tokens, device, dtype)

    def jobs():
        return [parts.CompressionJob(table, w, order(tokens))
                for table, w in zip(fresh_step(), windows)]

    def together():
        step.compress_step(tables["jobs"])

    def one_by_one():
        for job in tables["jobs"]:
            step.compress(job.table, job.window, job.order)

    step_ms = {name: wall_ms(fn, sync, runs, setup=lambda: tables.update(jobs=jobs()))
               for name, fn in (("together", together), ("one_by_one", one_by_one))}

    # One decode step's attention at the batch, per-head tables of decode_tokens.
    B, N = shape["batch"], shape["decode_tokens"]
    decode_blocks = B * H * -(-N // bs)
    decode_pool = parts.HeadBlockCache(
        torch.randn(decode_blocks * bs * 2 * D, device=device).to(dtype), decode_blocks, bs, D,
        dtype)
    decode_tables = torch.randperm(decode_blocks, device=device).to(torch.int32).view(B * H, -1)
    import vllm_kvcompress_kernels as kernels
    from vllm_kvcompress.attention.ops.triton import pool_views

    query = torch.randn(B, H * G, D, device=device).to(dtype)
    seq_lens = torch.full((B * H,), N, dtype=torch.int32, device=device)
    starts = torch.arange(B + 1, dtype=torch.int32, device=device)
    layer_ms = wall_ms(lambda: kernels.paged_attention(
        query, *pool_views(decode_pool), decode_tables, seq_lens, starts, scale,
        max_seq_len=N, max_query_len=1), sync, runs)
    decode_ms = layer_ms * L
    return {**shape, "dtype": str(dtype).removeprefix("torch."), "device": device_name(device),
            "evicted_kvs": evicted["n"], "compress_ms": compress_ms, "stats_ms": stats_ms,
            "decode_attention_ms": decode_ms,
            "compress_share_of_decode_step": compress_ms / decode_ms,
            "step_compress_ms_together": step_ms["together"],
            "step_compress_ms_one_by_one": step_ms["one_by_one"]}


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=4096)
    parser.add_argument("--rate", type=float, default=8)
    parser.add_argument("--step-requests", type=int, default=8,
                        help="requests compressed in one step (together vs one at a time)")
    parser.add_argument("--step-tokens", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU in Triton's interpreter: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.smoke:
        shape = dict(layers=2, kv_heads=2, group=2, head_dim=32, block=16, tokens=96,
                     window=8, rate=args.rate, batch=2, decode_tokens=48, step_requests=3,
                     step_tokens=64)
        result = run(shape, torch.device("cpu"), torch.float32, runs=1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_compression needs CUDA (or --smoke for a CPU check)")
        shape = dict(layers=32, kv_heads=8, group=4, head_dim=128, block=16, tokens=args.tokens,
                     window=32, rate=args.rate, batch=args.batch,
                     decode_tokens=args.decode_tokens, step_requests=args.step_requests,
                     step_tokens=args.step_tokens)
        result = run(shape, torch.device("cuda"), torch.bfloat16, args.runs)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
