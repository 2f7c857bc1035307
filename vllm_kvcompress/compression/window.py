"""Observation windows: each request's most recent queries, per layer.

``plan()`` names the query rows of a step to keep and hands the attention
backend a capture buffer; the backend copies each layer's rows into it during
the forward; ``absorb()`` then files the whole step into the ring buffers with
one indexed write. The rings of all requests live in one tensor (a slot per
request, grown by doubling), so a decode step costs a fixed number of tensor
operations however many requests it carries. The rings live on the model's
device; which rows to keep is host arithmetic, uploaded once per step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention.metadata import QueryCapture
from ..ragged import token_rows
from .window_metric import ObservationWindow


class WindowStore:
    def __init__(self, num_layers: int, num_query_heads: int, head_dim: int,
                 size: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.size = size
        self.dtype = dtype
        self.device = torch.device(device)
        self.layer_shape = (num_layers, num_query_heads, head_dim)
        # [slots, L, size, Hq, D] queries and [slots, size] positions (-1: empty).
        self.queries = torch.zeros((0, num_layers, size, num_query_heads, head_dim),
                                   dtype=dtype, device=self.device)
        self.positions = torch.full((0, size), -1, dtype=torch.int64, device=self.device)
        self.written = np.zeros(0, dtype=np.int64)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def window(self, req_id: str) -> ObservationWindow | None:
        slot = self.slot_of.get(req_id)
        if slot is None:
            return None
        return ObservationWindow(self.queries[slot], self.positions[slot])

    def plan(self, req_ids: list[str], num_tokens: np.ndarray,
             first_positions: np.ndarray, wanted: list[bool]) -> QueryCapture | None:
        """The capture for this step: the last ``size`` token rows of every
        request in ``wanted``. None when nothing is wanted."""
        self._pending = None
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        take = np.where(np.asarray(wanted, dtype=bool), np.minimum(num_tokens, self.size), 0)
        if not take.any():
            return None
        keep = np.flatnonzero(take)
        slots = np.array([self._slot(req_ids[i]) for i in keep], dtype=np.int64)
        counts = take[keep]
        # Per captured row: its request (index into keep) and rank 0..count-1.
        owner, rank = (t.numpy() for t in token_rows(torch.from_numpy(counts)))
        ends = np.cumsum(num_tokens)[keep]  # token row after each request's last
        rows = np.repeat(ends - counts, counts) + rank
        positions = np.repeat(first_positions[keep] + num_tokens[keep] - counts,
                              counts) + rank
        ring = (self.written[slots][owner] + rank) % self.size
        self.written[slots] += counts
        # One upload: the rows to capture, and where each goes in the rings.
        index = torch.from_numpy(np.stack([slots[owner], ring, positions, rows]))
        slot_of_row, ring, positions, rows = index.to(self.device)
        self._pending = (slot_of_row, ring, positions)
        num_layers, heads, dim = self.layer_shape
        return QueryCapture(
            rows=rows,
            queries=torch.empty((num_layers, rows.numel(), heads, dim), dtype=self.dtype,
                                device=self.device))

    def absorb(self, capture: QueryCapture) -> None:
        """File the rows the backend copied into ``capture``."""
        if self._pending is None:
            raise RuntimeError("query capture absorbed without a plan for this step")
        slots, ring, positions = self._pending
        self._pending = None
        self.queries[slots, :, ring] = capture.queries.transpose(0, 1)
        self.positions[slots, ring] = positions

    def drop(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self.positions[slot] = -1
            self.written[slot] = 0
            self._free.append(slot)

    def _slot(self, req_id: str) -> int:
        slot = self.slot_of.get(req_id)
        if slot is not None:
            return slot
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.slot_of[req_id] = slot
        return slot

    def _grow(self) -> None:
        old = self.queries.shape[0]
        new = max(4, 2 * old)
        queries = self.queries.new_zeros((new,) + tuple(self.queries.shape[1:]))
        queries[:old] = self.queries
        positions = self.positions.new_full((new, self.size), -1)
        positions[:old] = self.positions
        self.queries, self.positions = queries, positions
        self.written = np.concatenate([self.written, np.zeros(new - old, dtype=np.int64)])
        self._free.extend(range(new - 1, old - 1, -1))
