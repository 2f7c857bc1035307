"""Tokens laid out request after request (a step's ragged batch)."""

from __future__ import annotations

import torch


def token_rows(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For tokens laid out row after row (``counts[r]`` each): every token's
    row and its index within that row."""
    row_of_token = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    return row_of_token, torch.arange(int(counts.sum())) - starts[row_of_token]
