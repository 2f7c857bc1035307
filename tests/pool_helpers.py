"""Requests held in one small head-block pool, as the compressor sees them:
shared by the statistics and compression-step tests."""

import numpy as np
import torch

from vllm_kvcompress.attention.pool_view import HeadBlockCache
from vllm_kvcompress.compression.window_metric import ObservationWindow
from vllm_kvcompress.head_table import HeadTable

LAYERS, HEADS, GROUP, DIM, BS, WINDOW = 3, 2, 3, 16, 16, 8


def requests(seeds, seq_lens=None):
    """One pool holding a request per seed: each a table with ragged heads
    (one empty) whose KVs sit out of position order in shuffled blocks, and
    a window with two unfilled slots. Returns the pool, the slots'
    positions and per request (table, window, seq_len)."""
    seq_lens = seq_lens or [90] * len(seeds)
    drawn = []
    for seed, seq_len in zip(seeds, seq_lens):
        rng = np.random.default_rng(seed)
        lens = rng.integers(1, seq_len - WINDOW, size=(LAYERS, HEADS))
        lens[0, 1] = 0
        drawn.append((rng, seq_len, lens, -(-lens // BS)))
    total = sum(int(counts.sum()) for *_, counts in drawn)
    ids = np.random.default_rng(seeds[0] + 100).permutation(total + 5).astype(np.int32)
    gen = torch.Generator().manual_seed(seeds[0])
    pool = HeadBlockCache.empty(total + 5, BS, DIM, torch.float32)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    kv_position = torch.full((total + 5, BS), -1, dtype=torch.int32)
    out, used = [], 0
    for rng, seq_len, lens, counts in drawn:
        table = HeadTable(LAYERS, HEADS, BS)
        table.append_blocks(counts, ids[used: used + int(counts.sum())])
        used += int(counts.sum())
        table.lens[:] = lens
        for layer in range(LAYERS):
            for head in range(HEADS):
                n = int(lens[layer, head])
                blocks = torch.from_numpy(table.table[layer, head, : counts[layer, head]]).long()
                kept = np.sort(rng.permutation(seq_len)[:n])[rng.permutation(n)]
                flat = kv_position[blocks].reshape(-1)
                flat[:n] = torch.from_numpy(kept.astype(np.int32))
                kv_position[blocks] = flat.view(-1, BS)
        positions = torch.arange(seq_len - WINDOW, seq_len)
        positions[:2] = -1
        window = ObservationWindow(
            torch.randn(LAYERS, WINDOW, HEADS * GROUP, DIM, generator=gen), positions)
        out.append((table, window, seq_len))
    return pool, kv_position, out
