"""Per-head block tables and lengths of the requests in vLLM's persistent batch.

vLLM's model runner keeps its requests in a persistent batch whose rows are
added, cleared, moved and swapped as requests come and go; its token block
table follows those row operations and is never rebuilt. ``BatchHeadTables``
does the same for the per-head tables: the runner wraps the batch's block
table (``RowFollower``) so that every row operation is applied here as well,
grants are appended in place, and one vectorised add advances every
request's lengths per step.

Layout: ``table [L, rows, H, width]`` int32, ``lens`` and ``nblocks``
``[L, rows, H]`` int32. For the first R rows, layer l's tables are the
zero-copy view ``table[l, :R].reshape(R * H, width)`` whose row ``r * H + h``
is request r's KV head h: the one-head-sequence view the attention ops take.

A request that leaves the batch while still alive (vLLM drops unscheduled
requests from the batch and adds them back later) is parked as a
``HeadTable`` and restored when its row is added again.

On a GPU the tables the kernels read (``device_table``, ``device_lens``) live
on the device, and the bookkeeping (grants, capacity checks, snapshots for a
compression) reads host copies, so it never reads the device. Every change
is applied to both: row operations as tensor operations on each copy, grants
and token steps through small index uploads, never a whole-table copy. On
CPU the device copies are the host tensors themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..head_table import HeadTable, replace_ids
from ..protocol import BlockGrant, PoolBooksError
from ..ragged import token_rows


class BatchHeadTables:
    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int,
                 max_rows: int, width: int = 8, device: torch.device | str = "cpu",
                 separate_device_copy: bool | None = None):
        """``separate_device_copy`` defaults to "the device is not the CPU";
        tests force it on CPU to check the two-copy bookkeeping."""
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.block_size = block_size
        self.device = torch.device(device)
        self.mirrored = (self.device.type != "cpu" if separate_device_copy is None
                         else separate_device_copy)
        self.table = torch.zeros((num_layers, max_rows, num_kv_heads, width),
                                 dtype=torch.int32)
        self.nblocks = torch.zeros((num_layers, max_rows, num_kv_heads), dtype=torch.int32)
        self.lens = torch.zeros_like(self.nblocks)
        self.device_table = self._on_device(self.table)
        self.device_lens = self._on_device(self.lens)
        self.row_of: dict[str, int] = {}
        self._req_at: list[str | None] = [None] * max_rows
        self._parked: dict[str, HeadTable] = {}

    @property
    def width(self) -> int:
        return self.table.shape[3]

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, copy=True) if self.mirrored else host

    def _copies(self, host: torch.Tensor, device: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors one change must be applied to."""
        return (host, device) if self.mirrored else (host,)

    def _upload_row(self, row: int, with_table: bool = True) -> None:
        """Copy one row's host lengths (and table) to the device."""
        if not self.mirrored:
            return
        self.device_lens[:, row] = self.lens[:, row].to(self.device)
        if with_table:
            self.device_table[:, row] = self.table[:, row].to(self.device)

    # ------------------------------------------------ persistent-batch rows
    def add_row(self, row: int, req_id: str) -> None:
        """``req_id`` enters the batch at ``row`` (restored if it was parked)."""
        self._req_at[row], self.row_of[req_id] = req_id, row
        parked = self._parked.pop(req_id, None)
        self._zero(row)
        if parked is not None:
            width = parked.table.shape[2]
            self._reserve(width)
            self.table[:, row, :, :width] = torch.from_numpy(parked.table)
            self.nblocks[:, row] = torch.from_numpy(parked.nblocks)
            self.lens[:, row] = torch.from_numpy(parked.lens)
            self._upload_row(row)

    def clear_row(self, row: int) -> None:
        """The request at ``row`` leaves the batch; it is parked until it
        comes back or ``drop`` says it is gone."""
        req_id = self._req_at[row]
        if req_id is not None:
            self._parked[req_id] = self.snapshot(req_id)
            del self.row_of[req_id]
        self._req_at[row] = None
        self._zero(row)

    def _row_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor with a row per batch row (host and device)."""
        return (self.nblocks, *self._copies(self.table, self.device_table),
                *self._copies(self.lens, self.device_lens))

    def move_row(self, src: int, tgt: int) -> None:
        for tensor in self._row_tensors():
            tensor[:, tgt] = tensor[:, src]
        self._zero(src)
        req_id, self._req_at[src] = self._req_at[src], None
        self._req_at[tgt] = req_id
        if req_id is not None:
            self.row_of[req_id] = tgt

    def swap_row(self, a: int, b: int) -> None:
        pair, swapped = [a, b], [b, a]
        for tensor in self._row_tensors():
            tensor[:, pair] = tensor[:, swapped]
        self._req_at[a], self._req_at[b] = self._req_at[b], self._req_at[a]
        for row in pair:
            if self._req_at[row] is not None:
                self.row_of[self._req_at[row]] = row

    def drop(self, req_id: str) -> None:
        """``req_id`` finished or was preempted: forget it entirely."""
        self._parked.pop(req_id, None)
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self._req_at[row] = None
            self._zero(row)

    def _zero(self, row: int) -> None:
        self.nblocks[:, row] = 0
        for lens in self._copies(self.lens, self.device_lens):
            lens[:, row] = 0

    def _set_lens(self, row: int, value: int) -> None:
        for lens in self._copies(self.lens, self.device_lens):
            lens[:, row] = value

    def _reserve(self, width: int) -> None:
        if width <= self.width:
            return
        new_width = max(width, 2 * self.width)

        def grow(table: torch.Tensor) -> torch.Tensor:
            grown = table.new_zeros(table.shape[:3] + (new_width,))
            grown[..., : table.shape[3]] = table
            return grown

        self.table = grow(self.table)
        self.device_table = grow(self.device_table) if self.mirrored else self.table

    # ------------------------------------------------ per-step updates
    def apply_grants(self, grants: dict[str, list[BlockGrant]]) -> None:
        """Append this step's granted ids to the rows of their requests, all
        requests at once."""
        rows, counts, ids = [], [], []
        for req_id, request_grants in grants.items():
            row = self.row_of.get(req_id)
            if row is None:
                raise PoolBooksError(
                    f"head-blocks granted to {req_id}, which is not in the batch")
            for grant in request_grants:
                if grant.fresh:
                    self._zero(row)
                    self._set_lens(row, grant.cached_tokens)
                rows.append(row)
                counts.append(grant.counts.reshape(-1))
                ids.append(grant.block_ids)
        if not rows:
            return
        heads = self.num_layers * self.num_kv_heads
        # Grants of one request are applied in order: sum them per (row, head).
        per_grant = np.stack(counts).astype(np.int64)  # [G, L*H]
        total = int(per_grant.sum())
        if total != sum(len(i) for i in ids):
            raise PoolBooksError("a grant's block ids do not match its counts")
        if total == 0:
            return
        grant_of = np.repeat(np.arange(len(rows)), heads)  # [G*L*H]
        head = np.tile(np.arange(heads), len(rows))
        layer, kv_head = head // self.num_kv_heads, head % self.num_kv_heads
        row = np.asarray(rows)[grant_of]
        flat_counts = per_grant.reshape(-1)
        nblocks = self.nblocks.numpy()
        # Blocks already held, plus those appended by earlier grants of the
        # same (row, head) in this step.
        key = row * heads + head
        earlier = _exclusive_running_sum(key, flat_counts)
        first_col = nblocks[layer, row, kv_head].astype(np.int64) + earlier
        self._reserve(int((first_col + flat_counts).max()))
        each = np.repeat(np.arange(len(flat_counts)), flat_counts)
        col = first_col[each] + np.arange(total) - (np.cumsum(flat_counts) - flat_counts)[each]
        where = (layer[each], row[each], kv_head[each], col)
        block_ids = np.concatenate(ids)
        self.table.numpy()[where] = block_ids
        np.add.at(nblocks, (layer, row, kv_head), flat_counts.astype(np.int32))
        if self.mirrored:  # one upload of the written cells, then one scatter
            cells = torch.from_numpy(np.stack([*where, block_ids]).astype(np.int64))
            cells = cells.to(self.device)
            self.device_table[tuple(cells[:4])] = cells[4].to(self.device_table.dtype)

    def advance(self, num_tokens: np.ndarray) -> torch.Tensor:
        """Slots ``[L, T, H]`` (on the device) of the next ``num_tokens[r]``
        tokens of rows ``0..R-1`` (tokens in row order), and their lengths
        advanced."""
        num_rows = len(num_tokens)
        counts = torch.from_numpy(np.asarray(num_tokens, dtype=np.int64))
        lens = self.lens[:, :num_rows]
        capacity = self.nblocks[:, :num_rows].long() * self.block_size
        if (lens.long() + counts[None, :, None] > capacity).any():  # host books
            raise PoolBooksError(
                "head-block table too short for the scheduled tokens: the "
                "scheduler and the worker disagree about a request")
        row_of_token, offset = (x.to(self.device) for x in token_rows(counts))
        device_counts = counts.to(self.device)
        logical = (self.device_lens[:, :num_rows].long()[:, row_of_token, :]
                   + offset[None, :, None])  # [L, T, H]
        layers = torch.arange(self.num_layers, device=self.device)[:, None, None]
        heads = torch.arange(self.num_kv_heads, device=self.device)[None, None, :]
        rows = row_of_token[None, :, None]
        flat = ((layers * self.table.shape[1] + rows) * self.num_kv_heads + heads
                ) * self.width + logical // self.block_size
        blocks = self.device_table.view(-1)[flat].long()
        for lens, step in zip(self._copies(self.lens, self.device_lens),
                              (counts, device_counts)):
            lens[:, :num_rows] += step.to(torch.int32)[None, :, None]
        return blocks * self.block_size + logical % self.block_size

    # ------------------------------------------------ one request
    def snapshot(self, req_id: str) -> HeadTable:
        """A copy of ``req_id``'s tables (in the batch or parked)."""
        parked = self._parked.get(req_id)
        if parked is not None:
            return parked
        row = self.row_of[req_id]
        width = max(int(self.nblocks[:, row].max()), 1)
        return HeadTable.from_arrays(
            self.table[:, row, :, :width].numpy().copy(),
            self.nblocks[:, row].numpy().astype(np.int64),
            self.lens[:, row].numpy().astype(np.int64),
            self.block_size,
        )

    def replace_ids(self, req_id: str, sources: np.ndarray, copies: np.ndarray) -> None:
        """Point ``req_id``'s tables at the copies of shared blocks."""
        row = self.row_of[req_id]
        table = self.table[:, row].numpy().copy()
        replace_ids(table, sources, copies)
        self.table[:, row] = torch.from_numpy(table)
        self._upload_row(row)

    def store_lengths(self, req_id: str, table: HeadTable) -> None:
        """Write back a request's lengths after compaction shrank them (its
        surviving blocks keep their ids and order)."""
        row = self.row_of[req_id]
        self.nblocks[:, row] = torch.from_numpy(table.nblocks.astype(np.int32))
        self.lens[:, row] = torch.from_numpy(table.lens.astype(np.int32))
        self._upload_row(row, with_table=False)

    def host_lengths(self, num_rows: int) -> torch.Tensor:
        """The host books' lengths ``[L, R*H]`` of the first ``num_rows``
        rows (a view, equal to ``layer_views``'s device lengths)."""
        return self.lens[:, :num_rows].reshape(self.num_layers, num_rows * self.num_kv_heads)

    def layer_views(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables ``[L, R*H, width]`` and lengths ``[L, R*H]`` of the
        first ``num_rows`` rows, on the device: views, no copy."""
        rows = num_rows * self.num_kv_heads
        return (self.device_table[:, :num_rows].reshape(self.num_layers, rows, self.width),
                self.device_lens[:, :num_rows].reshape(self.num_layers, rows))


def _exclusive_running_sum(key: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each position, the sum of ``values`` at earlier positions with the
    same ``key``."""
    order = np.argsort(key, kind="stable")
    sorted_keys, sorted_values = key[order], values[order]
    running = np.cumsum(sorted_values) - sorted_values
    group_start = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    group_of = np.repeat(group_start, np.diff(np.r_[group_start, len(key)]))
    out = np.empty_like(values)
    out[order] = running - running[group_of]
    return out


class RowFollower:
    """vLLM's block table for the persistent batch, with every row operation
    also applied to the per-head tables (the token block table itself stays
    empty: the scheduler grants no token blocks)."""

    def __init__(self, stock: Any, input_batch: Any, tables: BatchHeadTables):
        self._stock, self._batch, self._tables = stock, input_batch, tables

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stock, name)

    def __getitem__(self, index: int) -> Any:
        return self._stock[index]

    def add_row(self, block_ids, row: int) -> None:
        self._stock.add_row(block_ids, row)
        self._tables.add_row(row, self._batch.req_ids[row])

    def clear_row(self, row: int) -> None:
        self._stock.clear_row(row)
        self._tables.clear_row(row)

    def move_row(self, src: int, tgt: int) -> None:
        self._stock.move_row(src, tgt)
        self._tables.move_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        self._stock.swap_row(src, tgt)
        self._tables.swap_row(src, tgt)
