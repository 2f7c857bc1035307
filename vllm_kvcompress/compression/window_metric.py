"""Scoring held KVs from the observation window's attention (the ``squared``
and ``cake`` metrics) into the per-slot stored metric.

Two paths give the same numbers: torch, one layer at a time over keys
gathered from the pool, or the ops' statistics kernel, which reads the pool
in place and takes every layer of every request compressed in a step in one
call (``kernel_statistics``), so a step's launches do not grow with the
number of requests it compresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..attention.pool_view import HeadBlockCache
from ..head_table import HeadTable
from .cake import WindowSums, layer_statistics, preference_weights, window_sums
from .metrics import max_pool_keys, squared_attention, window_attention


@dataclass
class RequestKVs:
    """One request's held KVs on the pool's device, by logical index: its
    block table is uploaded once per compression, and every stage of the
    compression (statistics, key gathers, compaction moves) reads that copy."""

    table: HeadTable  # the host books
    ids: torch.Tensor  # [L, H, width] int64 block ids
    lens: torch.Tensor  # [L, H] int64
    in_head: torch.Tensor  # [L, H, M] which logical indices each head holds
    slots: torch.Tensor  # [L, H, M] int64 pool slots (0 past a head's length)

    @classmethod
    def of(cls, table: HeadTable, device: torch.device) -> RequestKVs:
        """The request's table on ``device`` (the pool's), M its widest head."""
        lens = torch.as_tensor(table.lens, dtype=torch.int64, device=device)
        logical = torch.arange(int(table.lens.max()), device=device)
        in_head = logical < lens[..., None]
        ids = torch.as_tensor(table.table, device=device).long()
        blocks = ids[:, :, logical // table.block_size]
        slots = torch.where(in_head, blocks * table.block_size + logical % table.block_size, 0)
        return cls(table, ids, lens, in_head, slots)

    def block_ids(self) -> torch.Tensor:
        """[L, H, blocks] ids of the blocks covering the widest head."""
        return self.ids[:, :, : -(-self.slots.shape[2] // self.table.block_size)]


@dataclass
class ObservationWindow:
    """The request's most recent queries, per layer (after RoPE)."""

    queries: torch.Tensor  # [L, W, Hq, D]
    positions: torch.Tensor  # [W] token positions, -1 where empty


class WindowMetric:
    """The stored metric's window-attention scoring, for the compressor."""

    def __init__(self, pool: HeadBlockCache, kv_metric: torch.Tensor,
                 kv_position: torch.Tensor, layout: str, scale: float,
                 window_statistics=None, sum_over_ranks=lambda values: values):
        self.pool = pool
        self.slot_position = kv_position  # [P, bs]
        self.kv_metric = kv_metric.view(-1)
        self.kv_position = kv_position.view(-1)
        self.layout = layout
        self.scale = scale
        # The ops' statistics kernel (reads the pool in place); None: torch,
        # one layer at a time.
        self.window_statistics = window_statistics
        # With tensor parallelism this rank holds some of the KV heads; CAKE's
        # layer statistics (sums over heads) are summed over all ranks so
        # every rank splits its budget over layers as one engine would.
        self.sum_over_ranks = sum_over_ranks

    def step_statistics(self, jobs: list[tuple[object, RequestKVs, ObservationWindow]]
                        ) -> list:
        """The kernel's statistics of every ``(scorer, request, window)`` of a
        step, one kernel call per kind (per group head for a ``per_group``
        scorer such as CAKE's, else per KV head); None per job on the torch
        path or for a scorer that does not read the window."""
        found = [None] * len(jobs)
        if self.window_statistics is None:
            return found
        for per_group in (False, True):
            picked = [i for i, (scorer, request, _) in enumerate(jobs)
                      if request is not None and scorer.reads_window
                      and scorer.per_group == per_group]
            if picked:
                stats = self.kernel_statistics([jobs[i][1:] for i in picked], per_group)
                for i, one in zip(picked, stats):
                    found[i] = one
        return found

    def update(self, scorer, request: RequestKVs, window: ObservationWindow, order,
               stats=None) -> tuple[torch.Tensor, np.ndarray | None]:
        """Score each KV from this window's attention into its stored metric
        (CAKE's indicator for a ``per_group`` scorer, else the squared
        attention); returns the metric and, for CAKE, each layer's
        preference weight. ``stats``: this request's kernel statistics if
        the step computed them."""
        if self.window_statistics is not None and stats is None:
            stats = self.kernel_statistics([(request, window)], scorer.per_group)[0]
        seen = window.positions >= 0
        # The torch path's queries (a copy); the kernel took the window whole.
        queries = window.queries[:, seen] if stats is None else None  # [L, W, Hq, D]
        query_positions = window.positions[seen]
        slots, lens, valid = request.slots, request.lens, request.in_head
        if scorer.per_group:
            return self._cake_metric(request, queries, query_positions, order.settings, stats)
        if stats is not None:
            fresh = stats.sum_p2
        else:
            fresh = torch.stack([
                squared_attention(window_attention(*self._layer_inputs(
                    request, queries, query_positions, layer)))
                for layer in range(slots.shape[0])])
        if order.after_prompt:
            fresh = max_pool_keys(fresh.flatten(0, 1), self.kv_position[slots].flatten(0, 1),
                                  lens.flatten()).view_as(fresh)
        self.kv_metric[slots[valid]] += fresh[valid]
        return self.kv_metric[slots], None

    def _layer_inputs(self, request: RequestKVs, queries: torch.Tensor,
                      query_positions: torch.Tensor, layer: int) -> tuple:
        """``window_attention``'s arguments for one layer: the layer's keys
        gathered from the pool, padded to the widest head."""
        _, num_heads, width = request.slots.shape
        keys = self.pool.keys(request.block_ids()[layer].reshape(-1), self.layout)
        keys = keys.reshape(num_heads, -1, self.pool.head_dim)[:, :width]
        q = queries[layer].reshape(len(query_positions), num_heads, -1, self.pool.head_dim)
        return (keys, self.kv_position[request.slots[layer]], request.lens[layer], q,
                query_positions, self.scale)

    def kernel_statistics(self, batch: list[tuple[RequestKVs, ObservationWindow]],
                          per_group: bool) -> list:
        """The ops' statistics kernel over every layer of every request in
        ``batch``, in one call. Layers are the kernel's requests, so each
        (layer, head) is one row and the sums ``[L, H, M]`` cover the GQA
        group; ``per_group`` makes each (layer, group head) a request instead,
        for sums ``[L, H, G, M]`` and entropies ``[L, G, H]`` over the keys
        older than the window (CAKE). Windows go in whole: an empty entry
        (position -1) sees no key and adds nothing."""
        num_layers, num_heads, _ = batch[0][0].slots.shape
        width = max(request.slots.shape[2] for request, _ in batch)
        num_blocks = max(request.block_ids().shape[2] for request, _ in batch)
        queries, positions, tables, lens, before = [], [], [], [], []
        for request, window in batch:
            block_tables = request.block_ids().to(torch.int32)  # [L, H, nb]
            block_tables = torch.nn.functional.pad(
                block_tables, (0, num_blocks - block_tables.shape[2]))
            seq_lens = request.lens.to(torch.int32)
            q = window.queries  # [L, W, H*G, D]
            if per_group:  # -> [L*G, W, H, D]: G kernel requests per layer
                group = q.shape[2] // num_heads
                q = q.reshape(num_layers, q.shape[1], num_heads, group, -1)
                q = q.permute(0, 3, 1, 2, 4).reshape(num_layers * group, q.shape[1],
                                                     num_heads, -1)
                block_tables = block_tables[:, None].expand(-1, group, -1, -1)
                seq_lens = seq_lens[:, None].expand(-1, group, -1)
                # CAKE's entropy counts the keys older than the window's first query.
                first = window.positions[window.positions >= 0].min()
                before.append(first.expand(num_layers * group))
            queries.append(q)
            positions.append(window.positions.view(1, -1).expand(q.shape[0], -1))
            tables.append(block_tables.reshape(-1, num_blocks))
            lens.append(seq_lens.reshape(-1))
        stats = self.window_statistics(
            self.pool, torch.cat(queries).contiguous(), torch.cat(positions).contiguous(),
            torch.cat(tables), torch.cat(lens), self.slot_position, self.scale, width,
            entropy_before=torch.cat(before) if per_group else None)
        per_request = len(lens[0])  # kernel rows of one request
        out = []
        for index, (request, _) in enumerate(batch):
            rows = slice(index * per_request, (index + 1) * per_request)
            own = request.slots.shape[2]
            sum_p, sum_p2 = (x[rows, :own] for x in (stats.sum_p, stats.sum_p2))
            entropy = stats.entropy[rows]
            if per_group:
                sum_p, sum_p2 = (x.view(num_layers, -1, num_heads, own).transpose(1, 2)
                                 for x in (sum_p, sum_p2))
                out.append(type(stats)(sum_p, sum_p2, entropy.view(num_layers, -1, num_heads)))
            else:
                out.append(type(stats)(*(x.view(num_layers, num_heads, *x.shape[1:])
                                         for x in (sum_p, sum_p2, entropy))))
        return out

    def _cake_metric(self, request: RequestKVs, queries: torch.Tensor | None,
                     query_positions: torch.Tensor, settings, stats
                     ) -> tuple[torch.Tensor, np.ndarray]:
        """CAKE's indicator into the stored metric, and the layers' weights
        (host numbers, one per layer)."""
        slots, lens, valid = request.slots, request.lens, request.in_head
        num_layers = slots.shape[0]
        if stats is not None:
            entropies = stats.entropy.sum(dim=(1, 2)).tolist()
            sums = [WindowSums(stats.sum_p[layer], stats.sum_p2[layer], entropies[layer],
                               len(query_positions)) for layer in range(num_layers)]
        else:
            sums = []
            for layer in range(num_layers):
                inputs = self._layer_inputs(request, queries, query_positions, layer)
                sums.append(window_sums(window_attention(*inputs), inputs[1], lens[layer],
                                        query_positions))
        entropy, shift = np.zeros(num_layers), np.zeros(num_layers)
        for layer in range(num_layers):
            layer_stats = layer_statistics(sums[layer], self.kv_position[slots[layer]],
                                           lens[layer], query_positions, settings.cake_gamma)
            entropy[layer], shift[layer] = layer_stats.entropy, layer_stats.shift
            # Replaced, not added: a variance across queries does not add up
            # over windows, and CAKE judges KVs by the latest window alone (a
            # sum would also favour KVs that merely survived many compressions).
            self.kv_metric[slots[layer][valid[layer]]] = layer_stats.indicator[valid[layer]]
        metric = self.kv_metric[slots]
        entropy, shift = self.sum_over_ranks(np.stack([entropy, shift]))
        return metric, preference_weights(entropy, shift, settings.cake_tau1,
                                          settings.cake_tau2)
