"""The head-block pool tensor: vLLM's KV allocation seen as one-head blocks.

vLLM allocates one int8 buffer for every layer's KV cache. Viewed as
``[P, 1, block_size, 2 * head_dim]`` (P = layers x token-blocks x KV heads) it
is a pool of head-blocks that any layer may use, laid out exactly like the
stock CPU backend's per-layer cache with one KV head, so vLLM's own kernels
read and write it.
"""

from __future__ import annotations

import torch


class HeadBlockCache:
    def __init__(self, storage_owner: torch.Tensor, num_head_blocks: int,
                 block_size: int, head_dim: int, dtype: torch.dtype):
        storage = storage_owner.untyped_storage()
        elem = torch.empty(0, dtype=dtype).element_size()
        need = num_head_blocks * block_size * 2 * head_dim * elem
        if storage.nbytes() < need:
            raise RuntimeError(
                f"KV buffer holds {storage.nbytes()} bytes, the head-block pool "
                f"needs {need}"
            )
        self.kv = torch.empty(0, dtype=dtype, device=storage_owner.device).set_(
            storage, 0, (num_head_blocks, 1, block_size, 2 * head_dim)
        )
        self.num_head_blocks = num_head_blocks
        self.block_size = block_size
        self.head_dim = head_dim

    @classmethod
    def empty(cls, num_head_blocks: int, block_size: int, head_dim: int,
              dtype: torch.dtype) -> "HeadBlockCache":
        """A fresh zeroed pool (tests)."""
        buf = torch.zeros(num_head_blocks * block_size * 2 * head_dim, dtype=dtype)
        return cls(buf, num_head_blocks, block_size, head_dim, dtype)

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value views ``[P, 1, block_size, head_dim]`` each."""
        p, _, n, _ = self.kv.shape
        return self.kv.view(p, 1, 2 * n, self.head_dim).chunk(2, dim=2)

    def packed_views(self, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as vLLM's kernel packed them inside each head-block: key
        ``[P, head_dim, block_size]`` for "k_transposed" (else
        ``[P, block_size, head_dim]``), value ``[P, block_size, head_dim]``."""
        halves = self.kv.view(self.num_head_blocks, 2, -1)
        bs, d = self.block_size, self.head_dim
        key_shape = (-1, d, bs) if layout == "k_transposed" else (-1, bs, d)
        return halves[:, 0].view(key_shape), halves[:, 1].view(-1, bs, d)

    def keys(self, block_ids: torch.Tensor, layout: str) -> torch.Tensor:
        """Keys ``[N, block_size, head_dim]`` of head-blocks ``block_ids``."""
        keys = self.packed_views(layout)[0][block_ids]
        return keys.transpose(1, 2) if layout == "k_transposed" else keys

    def gather(self, slots: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the KVs at pool ``slots`` [..., M] (block id x
        block_size + offset): ``[..., M, head_dim]`` each, in the pool's dtype."""
        key_view, value_view = self.packed_views(layout)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        if layout == "k_transposed":  # [P, D, bs]: the slice sits between the indices
            keys = key_view.permute(0, 2, 1)[blocks, offsets]
        else:
            keys = key_view[blocks, offsets]
        return keys, value_view[blocks, offsets]
