"""Small helpers shared by the plain-torch references (no Triton needed)."""

from __future__ import annotations

import torch


def logical_slots(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical slot of each of the first ``length`` logical positions of every row.

    Returns ``(slots [N_rows, length] int64, valid [N_rows, length] bool)`` where
    ``valid`` is ``index < seq_lens[row]``; invalid entries point at slot 0 so they
    can be gathered safely and masked afterwards.
    """
    n_rows = block_tables.shape[0]
    device = block_tables.device
    idx = torch.arange(length, device=device)
    valid = idx[None, :] < seq_lens.to(device=device, dtype=torch.int64)[:, None]
    blk_col = (idx // block_size).clamp(max=max(block_tables.shape[1] - 1, 0))
    if block_tables.shape[1] == 0:
        blocks = torch.zeros(n_rows, length, dtype=torch.int64, device=device)
    else:
        blocks = block_tables.to(torch.int64)[:, blk_col]
    slots = blocks * block_size + (idx % block_size)[None, :]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    return slots, valid


def split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot -> (block id, offset inside the block)."""
    return slots // block_size, slots % block_size
