"""Helpers for tests and benchmarks: random head-block pools in the engine's layout.

Not used by the kernels themselves; importing it needs only torch.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_ready() -> tuple[bool, str]:
    """Can the Triton kernels run here (CUDA, or the interpreter on CPU)?"""
    from ._triton_guard import HAS_TRITON

    if not HAS_TRITON:
        return False, "triton is not importable"
    if DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA and TRITON_INTERPRET is not 1"
    return True, ""


def make_pool(
    seq_lens: list[int],
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    spare_blocks: int = 3,
    extra_table_cols: int = 1,
    seed: int = 0,
    device: torch.device = DEVICE,
):
    """A shuffled pool holding rows of the given lengths.

    Returns dict with key_cache/value_cache (strided views of one
    ``[2, P, bs, 1, D]`` tensor), kv_metric, kv_position, block_tables (padded
    with -1 past each row's blocks) and seq_lens.  kv_position of each row is a
    shuffled random subset of ``[0, 2*L)`` so that KVs are permuted inside a head.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-n // block_size) for n in seq_lens]
    n_blocks = sum(blocks_per_row) + spare_blocks
    perm = torch.randperm(n_blocks, generator=gen)
    max_blocks = max(blocks_per_row + [0]) + extra_table_cols
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    kv = torch.randn(2, n_blocks, block_size, 1, head_dim, generator=gen).to(dtype)
    kv_position = torch.randint(0, 1000, (n_blocks, block_size), generator=gen, dtype=torch.int32)
    kv_metric = torch.rand(n_blocks, block_size, generator=gen)
    used = 0
    for row, (n, nb) in enumerate(zip(seq_lens, blocks_per_row)):
        ids = perm[used : used + nb]
        used += nb
        table[row, :nb] = ids.to(torch.int32)
        if n:
            pos = torch.randperm(2 * n, generator=gen)[:n]
            for idx in range(n):
                kv_position[ids[idx // block_size], idx % block_size] = int(pos[idx])
    return dict(
        kv=kv.to(device),
        kv_metric=kv_metric.to(device),
        kv_position=kv_position.to(device),
        block_tables=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_size=block_size,
    )


def kv_views(pool):
    kv = pool["kv"]
    return kv[0, :, :, 0, :], kv[1, :, :, 0, :]


def clone_pool(pool):
    out = dict(pool)
    for k in ("kv", "kv_metric", "kv_position", "block_tables", "seq_lens"):
        out[k] = pool[k].clone()
    return out


def row_keys(pool, row: int, which: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (or values) and positions of a row in logical order, by explicit indexing."""
    bs = pool["block_size"]
    n = int(pool["seq_lens"][row])
    kv = pool["kv"][which, :, :, 0, :]
    vecs, poss = [], []
    for idx in range(n):
        b = int(pool["block_tables"][row, idx // bs])
        vecs.append(kv[b, idx % bs])
        poss.append(int(pool["kv_position"][b, idx % bs]))
    d = kv.shape[-1]
    if not vecs:
        return torch.zeros(0, d, dtype=kv.dtype, device=kv.device), torch.zeros(0, dtype=torch.int64)
    return torch.stack(vecs), torch.tensor(poss, dtype=torch.int64)
