"""Per-head paged attention through every ops implementation (vLLM's C++ CPU
kernels, the Triton kernels of ``kernels/`` in the interpreter, the
FlashAttention view with a torch stand-in for FlashAttention, the plain-torch
oracle) on the engine's own pool view, persistent tables and metadata
builder, against a dense float64 computation; heads of one request hold
different numbers of KVs (as after compression), with decode and
chunked-prefill steps and GQA."""

import numpy as np
import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_kvcompress.attention.ops.cpu import CpuOps, write_cache
from vllm_kvcompress.attention.ops.flash import FlashOps
from vllm_kvcompress.attention.ops.flash_reference import flash_reference
from vllm_kvcompress.attention.ops.torch_ref import TorchOps
from vllm_kvcompress.attention.ops.triton import TritonOps
from vllm_kvcompress.attention.pool_view import HeadBlockCache
from vllm_kvcompress.attention.builder import StepInputs, build_metadata
from vllm_kvcompress.head_table import HeadTable
from vllm_kvcompress.protocol import BlockGrant
from vllm_kvcompress.worker.batch_tables import BatchHeadTables

from vllm_kvcompress_kernels.testing import triton_ready

# Each ops implementation, made for the kernel's ISA (only the CPU ops use it).
PATHS = {"cpu_ops": CpuOps, "torch": lambda isa: TorchOps(),
         "triton": lambda isa: TritonOps(),
         # FlashAttention's one-head-sequence view, with the torch stand-in
         # for vLLM's compiled FlashAttention (CUDA only).
         "flash_view": lambda isa: FlashOps(varlen=flash_reference)}


def scenario(rng, num_heads, group, head_dim, block_size, new_tokens, max_history):
    """Random requests with ragged per-head histories and this step's tokens."""
    num_reqs = len(new_tokens)
    history = [rng.integers(0, max_history, size=num_heads) for _ in range(num_reqs)]
    need = sum(int(np.ceil((h + n) / block_size).sum())
               for h, n in zip(history, new_tokens))
    ids = rng.permutation(need + 5)[:need].astype(np.int32)  # scattered blocks
    tables, used = [], 0
    for hist, n in zip(history, new_tokens):
        table = HeadTable(1, num_heads, block_size)
        counts = np.ceil((hist + n) / block_size).astype(np.int64)[None, :]
        table.append_blocks(counts, ids[used:used + counts.sum()])
        used += counts.sum()
        tables.append(table)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    hist_kv = [[(torch.randn(int(h), head_dim, generator=gen),
                 torch.randn(int(h), head_dim, generator=gen)) for h in hist]
               for hist in history]
    total = sum(new_tokens)
    step_k = torch.randn(total, num_heads, head_dim, generator=gen)
    step_v = torch.randn(total, num_heads, head_dim, generator=gen)
    query = torch.randn(total, num_heads * group, head_dim, generator=gen)
    return tables, history, hist_kv, step_k, step_v, query, need + 5


def engine_step(tables, new_tokens, pool):
    """The engine's path for one step: the requests' tables placed in a
    persistent batch through grants, slots from ``advance``, metadata from
    the builder's ``build_metadata``."""
    num_layers, num_heads = tables[0].shape
    batch = BatchHeadTables(num_layers, num_heads, pool.block_size, len(tables))
    for row, table in enumerate(tables):
        batch.add_row(row, str(row))
        batch.apply_grants({str(row): [BlockGrant(
            True, table.nblocks.astype(np.int32), table.held_ids())]})
        batch.lens[:, row] = torch.from_numpy(table.lens)
    slots = batch.advance(np.asarray(new_tokens))
    starts = torch.from_numpy(np.cumsum([0] + list(new_tokens)).astype(np.int32))
    metadata = build_metadata(StepInputs(pool, batch, {"l0": 0}), len(tables), starts)
    return metadata, slots


def write_history(ops, pool, tables, history, hist_kv):
    for table, hist, kvs in zip(tables, history, hist_kv):
        longest = int(hist.max()) if len(hist) else 0
        if longest == 0:
            continue
        slots = np.full((longest, len(hist)), -1, dtype=np.int64)
        keys = torch.zeros(longest, len(hist), pool.head_dim)
        values = torch.zeros_like(keys)
        for h, (k, v) in enumerate(kvs):
            logical = np.arange(len(k))
            blocks = table.table[0, h, logical // pool.block_size]
            slots[: len(k), h] = blocks * pool.block_size + logical % pool.block_size
            keys[: len(k), h], values[: len(v), h] = k, v
        ops.write_cache(pool, keys, values, torch.from_numpy(slots))
        table.lens[0] = hist


def dense_reference(history, hist_kv, step_k, step_v, query, new_tokens, group, scale):
    out = torch.zeros(query.shape, dtype=torch.float64)
    start = 0
    for hist, kvs, n in zip(history, hist_kv, new_tokens):
        for h, (k, v) in enumerate(kvs):
            keys = torch.cat([k, step_k[start:start + n, h]]).double()
            values = torch.cat([v, step_v[start:start + n, h]]).double()
            for j in range(n):
                visible = int(hist[h]) + j + 1
                q = query[start + j, h * group:(h + 1) * group].double()
                p = torch.softmax(q @ keys[:visible].T * scale, dim=-1)
                out[start + j, h * group:(h + 1) * group] = p @ values[:visible]
        start += n
    return out


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("num_heads, group, head_dim, block_size", [
    (3, 3, 64, 32),   # SmolLM2's shape
    (2, 4, 32, 32),
    (4, 1, 64, 64),
    (1, 8, 128, 32),
])
@pytest.mark.parametrize("new_tokens", [[1, 1, 1], [1, 37, 5], [70]])
def test_per_head_attention_matches_dense(path_name, num_heads, group, head_dim,
                                          block_size, new_tokens):
    if path_name == "triton" and not triton_ready()[0]:
        pytest.skip(triton_ready()[1])
    rng = np.random.default_rng(abs(hash((num_heads, group, block_size, len(new_tokens)))) % 2**32)
    tables, history, hist_kv, step_k, step_v, query, num_blocks = scenario(
        rng, num_heads, group, head_dim, block_size, new_tokens, max_history=150)
    ops = PATHS[path_name](_get_attn_isa(torch.float32, block_size, head_dim, "auto"))
    pool = HeadBlockCache.empty(num_blocks, block_size, head_dim, torch.float32)
    write_history(ops, pool, tables, history, hist_kv)
    metadata, slots = engine_step(tables, new_tokens, pool)
    ops.write_cache(pool, step_k, step_v, slots[0])
    output = torch.zeros_like(query)
    scale = head_dim ** -0.5
    ops.attend(pool, metadata, 0, query, output, scale)
    expected = dense_reference(history, hist_kv, step_k, step_v, query, new_tokens,
                               group, scale)
    torch.testing.assert_close(output.double(), expected, atol=2e-5, rtol=1e-4)


def test_empty_head_is_skipped_by_the_kernel_write():
    """A slot of -1 writes nothing: the pool stays zero."""
    pool = HeadBlockCache.empty(4, 32, 64, torch.float32)
    isa = _get_attn_isa(torch.float32, 32, 64, "auto")
    write_cache(pool, torch.ones(2, 1, 64), torch.ones(2, 1, 64),
                torch.full((2, 1), -1, dtype=torch.int64), isa)
    assert pool.kv.abs().sum() == 0
