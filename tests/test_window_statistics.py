"""The compressor's window statistics through the Triton statistics kernel
(Triton's interpreter here) equal the torch path's: all layers of a request
in one kernel call, and for CAKE every (layer, group head) as its own kernel
request with the entropy over the keys older than the window. Compared on
what the plan reads: the stored metric and CAKE's layer weights. A step's
requests in one call get what each gets alone."""

import numpy as np
import pytest
import torch

from vllm_kvcompress.attention.ops.triton import TritonOps
from vllm_kvcompress.compression.policies import POLICIES
from vllm_kvcompress.compression.window_metric import RequestKVs, WindowMetric
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.protocol import CompressOrder
from vllm_kvcompress_kernels.testing import triton_ready

from pool_helpers import requests

READY, WHY = triton_ready()


def request(seed: int):
    pool, kv_position, [(table, window, seq_len)] = requests([seed])
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
        metric = WindowMetric(pool, torch.zeros(kv_position.shape), kv_position.clone(),
                              "row_major", 0.25, window_statistics=kernel)
        results.append(metric.update(POLICIES[policy].scorer,
                                     RequestKVs.of(table, pool.kv.device), window, order))
    (torch_metric, torch_weights), (kernel_metric, kernel_weights) = results
    assert float(torch_metric.abs().max()) > 0
    torch.testing.assert_close(kernel_metric, torch_metric, atol=2e-6, rtol=1e-4)
    if policy == "cake":
        assert np.ptp(torch_weights) > 0  # the layers differ, so the weights matter
        np.testing.assert_allclose(kernel_weights, torch_weights, rtol=1e-4)
    else:
        assert torch_weights is None and kernel_weights is None


@pytest.mark.skipif(not READY, reason=WHY)
@pytest.mark.parametrize("per_group", [False, True])
def test_one_kernel_call_for_a_step_equals_each_request_alone(per_group):
    """A step's requests (of different widths and block counts) in one
    kernel call get the statistics each gets alone."""
    pool, kv_position, batch = requests([0, 1, 2], seq_lens=[90, 40, 130])
    metric = WindowMetric(pool, torch.zeros(kv_position.shape), kv_position,
                          "row_major", 0.25, window_statistics=TritonOps().window_statistics)
    jobs = [(RequestKVs.of(table, pool.kv.device), window) for table, window, _ in batch]
    assert len({request.slots.shape[2] for request, _ in jobs}) == 3
    together = metric.kernel_statistics(jobs, per_group)
    for job, joint in zip(jobs, together):
        alone = metric.kernel_statistics([job], per_group)[0]
        assert float(alone.sum_p2.max()) > 0
        for got, want in zip(joint, alone):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
