"""Plain-torch per-head paged attention: the test oracle for the fast paths.

Same signatures as ``ops.cpu``; K and V are stored row-major in the pool's
key/value views, so this path must only read what it wrote itself.
"""

from __future__ import annotations

import torch

from ...compression.reconstruction import reconstruction_attention
from ..metadata import HeadPagedMetadata
from ..pool_view import HeadBlockCache
from .moves import apply_moves


def write_cache(pool: HeadBlockCache, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor, isa: str = "", **_: object) -> None:
    """Store ``key``/``value`` [T, H, D] at per-head slots [T, H] (-1 skips)."""
    key_cache, value_cache = pool.key_value()
    t, h, d = key.shape
    slots = slot_mapping[:t].reshape(-1)
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // pool.block_size, slots % pool.block_size
    key_cache[blocks, 0, offsets] = key.reshape(-1, d)[keep].to(key_cache.dtype)
    value_cache[blocks, 0, offsets] = value.reshape(-1, d)[keep].to(value_cache.dtype)


def gather_head(pool: HeadBlockCache, block_row: torch.Tensor, length: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` keys and values [length, D] of one head."""
    key_cache, value_cache = pool.key_value()
    num_blocks = -(-length // pool.block_size)
    ids = block_row[:num_blocks].long()
    keys = key_cache[ids, 0].reshape(-1, pool.head_dim)[:length]
    values = value_cache[ids, 0].reshape(-1, pool.head_dim)[:length]
    return keys, values


def causal_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The last ``c`` queries [c, G, D] of a sequence over its ``L`` keys and
    values [L, D], causal from the bottom right: query j sees the first
    ``L - c + j + 1`` KVs. fp32 math, result [c, G, D] float32."""
    c, length = queries.shape[0], keys.shape[0]
    scores = torch.einsum("cgd,kd->cgk", queries.float(), keys.float()) * scale
    visible = torch.arange(length)[None, :] <= (length - c + torch.arange(c))[:, None]
    probs = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("cgk,kd->cgd", probs, values.float())


def attend(pool: HeadBlockCache, meta: HeadPagedMetadata, layer: int,
           query: torch.Tensor, output: torch.Tensor, scale: float,
           isa: str = "", **_: object) -> None:
    """Causal attention of ``query`` [T, H*G, D] over each head's own KVs."""
    q = meta.to_head_major(query)
    heads_out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    lengths = meta.seq_lens[layer].tolist()
    for row, length in enumerate(lengths):
        lo, hi = starts[row], starts[row + 1]
        if hi == lo:
            continue
        keys, values = gather_head(pool, meta.block_tables[layer, row], length)
        heads_out[lo:hi] = causal_attention(q[lo:hi], keys, values, scale).to(q.dtype)
    meta.store_token_major(output, heads_out)


class TorchOps:
    """The ops interface in plain torch (the oracle): K and V row-major in
    the two halves of each head-block."""

    name = "torch"

    def write_cache(self, pool: HeadBlockCache, key, value, slot_mapping, **_) -> None:
        write_cache(pool, key, value, slot_mapping)

    def attend(self, pool: HeadBlockCache, meta: HeadPagedMetadata, layer: int,
               query, output, scale: float, **_) -> None:
        attend(pool, meta, layer, query, output, scale)

    def key_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> str:
        return "row_major"

    move_slots = staticmethod(apply_moves)
    # kvzip's pass: torch, tiled (compression/reconstruction.py).
    reconstruction_attention = staticmethod(reconstruction_attention)
