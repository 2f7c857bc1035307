"""Decode (and one prefill chunk) per-head paged attention vs torch SDPA over dense KVs."""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from _bench_utils import copy_bandwidth_gbs, dense_kv, import_kernels, make_big_pool, time_ms

R, H, G, D, BS = 4, 8, 4, 128, 16
DTYPE = torch.bfloat16


def decode_case(K, length, copy_gbs, r=R):
    pool = make_big_pool(r, H, length, BS, D, DTYPE)
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(r, H * G, D, device="cuda", dtype=DTYPE)
    qsl = torch.arange(r + 1, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    args = (q, pool["key_cache"], pool["value_cache"], pool["block_tables"], pool["seq_lens"], qsl, scale)
    run = lambda: K.paged_attention(*args, out=out, max_seq_len=length, max_query_len=1)  # noqa: E731
    ms = time_ms(run)
    # dense baseline: [R, H, L, D] KVs; the G query heads of a group become G
    # "query tokens" of its KV head (exact for decode, no KV repetition).
    kd, vd = dense_kv(pool)
    kd = kd.view(r, H, length, D)
    vd = vd.view(r, H, length, D)
    qd = q.view(r, H, G, D)
    sdpa = lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale)  # noqa: E731
    ms_sdpa = time_ms(sdpa)
    err = (out.float().view(r, H, G, D) - sdpa().float()).abs().max().item()
    nbytes = 2 * r * H * length * D * q.element_size()
    gbs = nbytes / (ms * 1e-3) / 1e9
    gbs_sdpa = nbytes / (ms_sdpa * 1e-3) / 1e9
    del pool, kd, vd
    torch.cuda.empty_cache()
    return dict(
        kernel="paged_attention decode", R=r, H=H, G=G, D=D, block_size=BS, dtype="bf16",
        tokens_per_head=length, ms=ms, GBps=gbs, frac_copy_bw=gbs / copy_gbs,
        sdpa_ms=ms_sdpa, sdpa_GBps=gbs_sdpa, sdpa_frac_copy_bw=gbs_sdpa / copy_gbs,
        max_abs_diff_vs_sdpa=err,
    )


def prefill_case(K, length, chunk, r=1):
    pool = make_big_pool(r, H, length, BS, D, DTYPE)
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(r * chunk, H * G, D, device="cuda", dtype=DTYPE)
    qsl = torch.arange(0, r * chunk + 1, chunk, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    run = lambda: K.paged_attention(  # noqa: E731
        q, pool["key_cache"], pool["value_cache"], pool["block_tables"], pool["seq_lens"], qsl, scale,
        out=out, max_seq_len=length, max_query_len=chunk)
    ms = time_ms(run, iters=20)
    # causal chunk at the end of the context: sum of visible keys per query
    visible = sum(length - chunk + i + 1 for i in range(chunk))
    flops = 4 * r * H * G * D * visible
    del pool
    torch.cuda.empty_cache()
    return dict(kernel="paged_attention prefill chunk", R=r, H=H, G=G, D=D, block_size=BS, dtype="bf16",
                tokens_per_head=length, chunk=chunk, ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12)


def run(copy_gbs, lengths=(4096, 32768, 131072)):
    K = import_kernels()
    rows = [decode_case(K, n, copy_gbs) for n in lengths]
    rows.append(prefill_case(K, 32768, 512))
    return rows


def tune(copy_gbs, length=32768, r=R):
    """Sweep the decode launch heuristics at one context length (prints; restores defaults)."""
    import importlib

    K = import_kernels()
    pa = importlib.import_module("vllm_kvcompress_kernels.paged_attention")
    pool = make_big_pool(r, H, length, BS, D, DTYPE)
    q = torch.randn(r, H * G, D, device="cuda", dtype=DTYPE)
    qsl = torch.arange(r + 1, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    args = (q, pool["key_cache"], pool["value_cache"], pool["block_tables"], pool["seq_lens"], qsl,
            1.0 / math.sqrt(D))
    nbytes = 2 * r * H * length * D * q.element_size()
    base = dict(pa.TUNING)
    results = []
    for block_n in (32, 64, 128):
        for warps in (4,):
            for stages in (2, 3):
                for pps in (4, 8):
                    pa.TUNING.update(block_n=block_n, num_warps=warps, num_stages=stages, programs_per_sm=pps)
                    try:
                        ms = time_ms(lambda: K.paged_attention(*args, out=out, max_seq_len=length,
                                                               max_query_len=1), warmup=3, iters=15)
                    except Exception as e:  # e.g. out of shared memory
                        print("fail", block_n, warps, stages, pps, type(e).__name__, flush=True)
                        continue
                    frac = nbytes / (ms * 1e-3) / 1e9 / copy_gbs
                    results.append((round(frac, 4), block_n, warps, stages, pps, round(ms, 4)))
                    print(f"block_n={block_n} warps={warps} stages={stages} pps={pps}: {ms:.4f} ms {frac:.3f}",
                          flush=True)
    pa.TUNING.clear()
    pa.TUNING.update(base)
    results.sort(reverse=True)
    del pool
    torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    a = ap.parse_args()
    bw = copy_bandwidth_gbs()
    if a.tune:
        res = tune(bw)
        print("BEST", json.dumps(dict(zip(("frac", "block_n", "num_warps", "num_stages", "programs_per_sm", "ms"),
                                          res[0]))))
        print(json.dumps(res[:10]))
    else:
        print(json.dumps(run(bw), indent=1))
