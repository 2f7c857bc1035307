"""Compaction (K, V, metric, position moves) and cache write, vs one decode step."""

from __future__ import annotations

import math

import torch

from _bench_utils import import_kernels, make_big_pool, time_ms

R, H, G, D, BS = 4, 8, 4, 128, 16
DTYPE = torch.bfloat16


def run(copy_gbs, length=32768, move_frac=0.25):
    K = import_kernels()
    pool = make_big_pool(R, H, length, BS, D, DTYPE)
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(R, H * G, D, device="cuda", dtype=DTYPE)
    qsl = torch.arange(R + 1, device="cuda", dtype=torch.int32)
    dec = time_ms(lambda: K.paged_attention(
        q, pool["key_cache"], pool["value_cache"], pool["block_tables"], pool["seq_lens"], qsl, scale,
        max_seq_len=length, max_query_len=1))

    # compaction: a quarter of all KVs move to disjoint random destinations
    n_slots = pool["key_cache"].shape[0] * BS
    m = int(move_frac * R * H * length)
    perm = torch.randperm(n_slots, device="cuda")[: 2 * m]
    moves = torch.stack([perm[:m], perm[m:]], dim=1).contiguous()
    args = (moves, pool["key_cache"], pool["value_cache"], pool["kv_metric"], pool["kv_position"])
    ms = time_ms(lambda: K.compact_kv(*args))
    ref_ms = time_ms(lambda: K.compact_kv_ref(*args), iters=10)
    nbytes = m * (2 * 2 * D * pool["kv"].element_size() + 2 * 4 + 2 * 4 + 16)  # K,V read+write, metric, pos, move
    rows = [dict(kernel="compact_kv", R=R, H=H, D=D, block_size=BS, dtype="bf16", tokens_per_head=length,
                 moves=m, ms=ms, torch_ref_ms=ref_ms, decode_step_ms=dec, frac_of_decode_step=ms / dec,
                 GBps=nbytes / (ms * 1e-3) / 1e9, frac_copy_bw=nbytes / (ms * 1e-3) / 1e9 / copy_gbs)]

    # cache write: a decode step (R tokens) and a 2048-token prefill chunk, per-head slots
    for t in (R, 2048):
        slots = torch.randperm(n_slots, device="cuda")[: t * H].view(t, H)
        key = torch.randn(t, H, D, device="cuda", dtype=DTYPE)
        value = torch.randn_like(key)
        pos = torch.arange(t, device="cuda")
        wargs = (key, value, slots, pool["key_cache"], pool["value_cache"], pool["kv_metric"],
                 pool["kv_position"], pos)
        wms = time_ms(lambda: K.write_kv_cache(*wargs))
        wref = time_ms(lambda: K.write_kv_cache_ref(*wargs), iters=10)
        rows.append(dict(kernel="write_kv_cache", R=R, H=H, D=D, block_size=BS, dtype="bf16", tokens=t,
                         ms=wms, torch_ref_ms=wref, decode_step_ms=dec, frac_of_decode_step=wms / dec))
    del pool
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import json

    from _bench_utils import copy_bandwidth_gbs

    print(json.dumps(run(copy_bandwidth_gbs()), indent=1))
