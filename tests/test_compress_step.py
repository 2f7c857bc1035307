"""The requests a step compresses together (one statistics call per kind,
one compaction call, one copy of the new lengths) end exactly as when each
is compressed alone: same evictions, same books, same pool."""

import copy

import pytest
import torch

from vllm_kvcompress.attention.ops.moves import apply_moves
from vllm_kvcompress.attention.ops.triton import TritonOps
from vllm_kvcompress.compression.compressor import CompressionJob, Compressor
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.protocol import CompressOrder
from vllm_kvcompress_kernels.testing import triton_ready

from pool_helpers import requests

READY, WHY = triton_ready()
POLICIES = ("kvcompress", "cake", "kvzip", "streamingllm", "adakv")
SEQ_LENS = (90, 70, 130, 110, 100)


def reconstruct(table, slots):
    """Stand-in for the worker's kvzip pass (a model run, tested in
    test_kvzip_engine): a fixed score per pool slot, so both runs see the
    same scores."""
    return torch.sin(slots.double() * 0.37).float().abs()


def run(ops, together: bool):
    pool, kv_position, held = requests(list(range(len(POLICIES))), seq_lens=list(SEQ_LENS))
    kv_metric = torch.zeros(kv_position.shape)
    statistics, move_slots = ((None, apply_moves) if ops is None
                              else (ops.window_statistics, ops.move_slots))
    compressor = Compressor(pool, kv_metric, kv_position, "row_major", 0.25,
                            move_slots=move_slots, window_statistics=statistics)
    jobs = []
    for policy, (table, window, seq_len) in zip(POLICIES, held):
        settings = KVCompressConfig(rate=16, policy=policy, protected_window=8)
        order = CompressOrder(settings, num_tokens=seq_len, after_prompt=True,
                              target_tokens=seq_len)
        jobs.append(CompressionJob(copy.deepcopy(table), window, order,
                                   reconstruct if policy == "kvzip" else None))
    if together:
        evicted = compressor.compress_step(jobs)
    else:
        evicted = [compressor.compress(job.table, job.window, job.order, job.reconstruct)
                   for job in jobs]
    return evicted, [job.table for job in jobs], pool.kv, kv_metric, kv_position


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_a_step_compresses_as_each_request_alone(ops):
    if ops == "triton" and not READY:
        pytest.skip(WHY)
    kernels = TritonOps() if ops == "triton" else None
    alone, together = run(kernels, together=False), run(kernels, together=True)
    assert all(count > 0 for count in alone[0]), alone[0]
    assert together[0] == alone[0]
    for joint, single in zip(together[1], alone[1]):
        assert (joint.lens == single.lens).all()
        assert (joint.nblocks == single.nblocks).all()
        assert (joint.table == single.table).all()
    for joint, single in zip(together[2:], alone[2:]):
        assert torch.equal(joint, single)
