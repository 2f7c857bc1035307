"""Observation windows: each request's most recent queries, per layer.

The attention backend copies out the query rows named by ``plan()`` during
the forward; ``absorb()`` then files them into per-request ring buffers, from
which the compressor scores the KVs.
"""

from __future__ import annotations

import numpy as np
import torch

from .compressor import ObservationWindow


class WindowStore:
    def __init__(self, num_layers: int, num_query_heads: int, head_dim: int,
                 size: int, dtype: torch.dtype):
        self.shape = (num_layers, size, num_query_heads, head_dim)
        self.size = size
        self.dtype = dtype
        self.windows: dict[str, ObservationWindow] = {}
        self._written: dict[str, int] = {}
        self._pending: list[tuple[str, slice, np.ndarray]] = []

    def plan(self, req_ids: list[str], num_tokens: list[int],
             first_positions: list[int], wanted: list[bool]) -> torch.Tensor | None:
        """Token rows of this step to capture: the last ``size`` tokens of
        every request in ``wanted``. None when nothing is wanted."""
        rows, start, offset = [], 0, 0
        self._pending = []
        for req_id, n, first, want in zip(req_ids, num_tokens, first_positions, wanted):
            take = min(n, self.size) if want else 0
            if take:
                rows.append(np.arange(start + n - take, start + n))
                positions = first + np.arange(n - take, n)
                self._pending.append((req_id, slice(offset, offset + take), positions))
                offset += take
            start += n
        return torch.from_numpy(np.concatenate(rows)) if rows else None

    def absorb(self, captured: dict[int, torch.Tensor]) -> None:
        """File the rows the backend captured (layer -> [rows, Hq, D])."""
        if not self._pending:
            return
        stacked = torch.stack([captured[layer] for layer in range(self.shape[0])])
        for req_id, rows, positions in self._pending:
            window = self.windows.get(req_id)
            if window is None:
                window = ObservationWindow(
                    queries=torch.zeros(self.shape, dtype=self.dtype),
                    positions=torch.full((self.size,), -1, dtype=torch.int64),
                )
                self.windows[req_id] = window
                self._written[req_id] = 0
            ring = (self._written[req_id] + np.arange(len(positions))) % self.size
            ring_t = torch.from_numpy(ring)
            window.queries[:, ring_t] = stacked[:, rows].to(self.dtype)
            window.positions[ring_t] = torch.from_numpy(positions)
            self._written[req_id] += len(positions)
        self._pending = []

    def drop(self, req_id: str) -> None:
        self.windows.pop(req_id, None)
        self._written.pop(req_id, None)
