"""The compressor's window statistics through the Triton statistics kernel
(Triton's interpreter here) equal the torch path's: all layers of a request
in one kernel call, and for CAKE every (layer, group head) as its own kernel
request with the entropy over the keys older than the window. Compared on
what the plan reads: the stored metric and CAKE's layer weights."""

import numpy as np
import pytest
import torch

from vllm_kvcompress.attention.ops.triton import TritonOps
from vllm_kvcompress.attention.pool_view import HeadBlockCache
from vllm_kvcompress.compression.compressor import Compressor, ObservationWindow
from vllm_kvcompress.compression.policies import POLICIES
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.head_table import HeadTable
from vllm_kvcompress.protocol import CompressOrder
from vllm_kvcompress_kernels.testing import triton_ready

READY, WHY = triton_ready()
LAYERS, HEADS, GROUP, DIM, BS, WINDOW = 3, 2, 3, 16, 16, 8


def request(seed: int):
    """A pool, a table with ragged heads (one empty) whose KVs sit out of
    position order, and a window with two unfilled slots."""
    rng = np.random.default_rng(seed)
    seq_len = 90
    lens = rng.integers(1, seq_len - WINDOW, size=(LAYERS, HEADS))
    lens[0, 1] = 0
    counts = -(-lens // BS)
    total = int(counts.sum())
    table = HeadTable(LAYERS, HEADS, BS)
    table.append_blocks(counts, rng.permutation(total + 5)[:total].astype(np.int32))
    table.lens[:] = lens
    gen = torch.Generator().manual_seed(seed)
    pool = HeadBlockCache.empty(total + 5, BS, DIM, torch.float32)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    kv_position = torch.full((total + 5, BS), -1, dtype=torch.int32)
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
    window = ObservationWindow(torch.randn(LAYERS, WINDOW, HEADS * GROUP, DIM, generator=gen),
                               positions)
    return pool, kv_position, table, window, seq_len


@pytest.mark.skipif(not READY, reason=WHY)
@pytest.mark.parametrize("policy, after_prompt", [("kvcompress", True), ("kvcompress", False),
                                                  ("cake", True)])
@pytest.mark.parametrize("seed", range(3))
def test_kernel_statistics_equal_the_torch_path(policy, after_prompt, seed):
    pool, kv_position, table, window, seq_len = request(seed)
    order = CompressOrder(KVCompressConfig(rate=4, policy=policy), num_tokens=seq_len,
                          after_prompt=after_prompt, target_tokens=seq_len)
    results = []
    for kernel in (None, TritonOps().window_statistics):
        compressor = Compressor(pool, torch.zeros(kv_position.shape), kv_position.clone(),
                                "row_major", 0.25, window_statistics=kernel)
        results.append(compressor.update_metric(POLICIES[policy], compressor.request_kvs(table),
                                                window, order))
    (torch_metric, torch_weights), (kernel_metric, kernel_weights) = results
    assert float(torch_metric.abs().max()) > 0
    torch.testing.assert_close(kernel_metric, torch_metric, atol=2e-6, rtol=1e-4)
    if policy == "cake":
        assert np.ptp(torch_weights) > 0  # the layers differ, so the weights matter
        np.testing.assert_allclose(kernel_weights, torch_weights, rtol=1e-4)
    else:
        assert torch_weights is None and kernel_weights is None
