"""Attention statistics of W window queries over per-head paged KVs, vs one decode step."""

from __future__ import annotations

import math

import torch

from _bench_utils import import_kernels, make_big_pool, time_ms

R, H, G, D, BS, W = 4, 8, 4, 128, 16, 32
DTYPE = torch.bfloat16


def case(K, length, with_ref):
    pool = make_big_pool(R, H, length, BS, D, DTYPE)
    scale = 1.0 / math.sqrt(D)
    queries = torch.randn(R, W, H * G, D, device="cuda", dtype=DTYPE)
    qpos = (length - W + torch.arange(W, device="cuda", dtype=torch.int32)).repeat(R, 1)
    args = (queries, qpos, pool["key_cache"], pool["block_tables"], pool["seq_lens"], pool["kv_position"], scale)
    ms = time_ms(lambda: K.attention_stats(*args, max_len=length), iters=20)
    # one decode step of attention (one layer) for the same batch and context
    q = torch.randn(R, H * G, D, device="cuda", dtype=DTYPE)
    qsl = torch.arange(R + 1, device="cuda", dtype=torch.int32)
    dec = time_ms(lambda: K.paged_attention(
        q, pool["key_cache"], pool["value_cache"], pool["block_tables"], pool["seq_lens"], qsl, scale,
        max_seq_len=length, max_query_len=1))
    row = dict(kernel="attention_stats", R=R, H=H, G=G, D=D, W=W, block_size=BS, dtype="bf16",
               tokens_per_head=length, ms=ms, decode_step_ms=dec, frac_of_decode_step=ms / dec)
    if with_ref:
        got = K.attention_stats(*args, max_len=length)
        ref_ms = time_ms(lambda: K.attention_stats_ref(*args, max_len=length), warmup=1, iters=3)
        exp = K.attention_stats_ref(*args, max_len=length)
        row["torch_ref_ms"] = ref_ms
        row["max_abs_diff_sum_p2_vs_ref"] = (got.sum_p2 - exp.sum_p2).abs().max().item()
    del pool
    torch.cuda.empty_cache()
    return row


def run(copy_gbs=None, lengths=(4096, 32768)):
    K = import_kernels()
    return [case(K, n, with_ref=True) for n in lengths]


def tune(length=32768):
    """Sweep the statistics launch heuristics at one context length (prints; restores defaults)."""
    import importlib

    K = import_kernels()
    mod = importlib.import_module("vllm_kvcompress_kernels.attention_stats")
    pool = make_big_pool(R, H, length, BS, D, DTYPE)
    queries = torch.randn(R, W, H * G, D, device="cuda", dtype=DTYPE)
    qpos = (length - W + torch.arange(W, device="cuda", dtype=torch.int32)).repeat(R, 1)
    args = (queries, qpos, pool["key_cache"], pool["block_tables"], pool["seq_lens"], pool["kv_position"],
            1.0 / math.sqrt(D))
    base = dict(mod.TUNING)
    results = []
    for bq in (64, 128):
        for bn in (32, 64):
            for warps in (4, 8):
                mod.TUNING.update(max_block_q=bq, block_n=bn, num_warps=warps)
                if bq < 128 and warps != 4:
                    continue  # num_warps applies to 128-query tiles only
                try:
                    ms = time_ms(lambda: K.attention_stats(*args, max_len=length), warmup=2, iters=10)
                except Exception as e:
                    print("fail", bq, bn, warps, type(e).__name__, flush=True)
                    continue
                results.append((round(ms, 4), bq, bn, warps))
                print(f"stats max_block_q={bq} block_n={bn} warps={warps}: {ms:.4f} ms", flush=True)
    mod.TUNING.clear()
    mod.TUNING.update(base)
    results.sort()
    del pool
    torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    if ap.parse_args().tune:
        res = tune()
        print("BEST", json.dumps(dict(zip(("ms", "max_block_q", "block_n", "num_warps"), res[0]))))
    else:
        print(json.dumps(run(), indent=1))
