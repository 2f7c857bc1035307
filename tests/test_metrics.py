"""KV-Compress's metric against a naive loop: softmax over all of a head's
visible keys, squared, summed over the window and the GQA group."""

import torch

from vllm_kvcompress.compression.metrics import (
    max_pool_keys,
    squared_attention,
    window_attention,
)


def naive(keys, key_pos, lens, queries, query_pos, scale):
    heads, width, _ = keys.shape
    out = torch.zeros(heads, width, dtype=torch.float64)
    for h in range(heads):
        for w in range(queries.shape[0]):
            visible = [i for i in range(int(lens[h])) if key_pos[h, i] <= query_pos[w]]
            if not visible:
                continue
            for g in range(queries.shape[2]):
                q = queries[w, h, g].double()
                logits = torch.stack([q @ keys[h, i].double() * scale for i in visible])
                p = torch.softmax(logits, dim=0)
                for i, pi in zip(visible, p):
                    out[h, i] += pi ** 2
    return out


def test_squared_attention_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    heads, width, group, window, dim = 3, 20, 3, 5, 8
    keys = torch.randn(heads, width, dim, generator=gen)
    lens = torch.tensor([20, 13, 0])
    # Positions are a permutation inside each head (as after compaction).
    key_pos = torch.stack([torch.randperm(width, generator=gen) for _ in range(heads)])
    queries = torch.randn(window, heads, group, dim, generator=gen)
    query_pos = torch.tensor([3, 9, 14, 18, 19])
    got = squared_attention(window_attention(keys, key_pos, lens, queries, query_pos, 0.35))
    torch.testing.assert_close(got.double(), naive(keys, key_pos, lens, queries,
                                                   query_pos, 0.35), atol=1e-6, rtol=1e-5)
    assert got[2].abs().sum() == 0  # an empty head scores nothing


def test_max_pool_stays_inside_each_head():
    metric = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    positions = torch.arange(9).repeat(2, 1)
    pooled = max_pool_keys(metric, positions, torch.tensor([8, 9]), kernel=3)
    assert pooled[0].tolist() == [5, 5, 5, 0, 0, 0, 0, 0, 0]  # index 8 is padding
    assert pooled[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_max_pool_finds_neighbours_by_position_after_compaction():
    """A compacted head holds its KVs out of position order; pooling must
    follow positions, not slots."""
    positions = torch.tensor([[40, 10, 30, 20, 50, 99]])  # slot 5 is padding
    metric = torch.tensor([[0.0, 7.0, 0.0, 0.0, 0.0, 8.0]])
    pooled = max_pool_keys(metric, positions, torch.tensor([5]), kernel=3)
    # Position order 10 (7), 20, 30, 40, 50: 7 reaches position 20 only.
    assert pooled[0].tolist() == [0, 7, 0, 7, 0, 0]
