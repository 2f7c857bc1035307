"""Worker-side compression of one request: statistics of the window queries
-> policy scores -> (per-layer budgets) -> which blocks go -> compaction ->
new per-head lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..attention.pool_view import HeadBlockCache
from ..head_table import HeadTable
from .budget import eviction_budget, kept_target
from .cake import WindowSums, layer_statistics, preference_weights, window_sums
from ..attention.ops.moves import apply_moves
from .compaction import slot_moves
from .layer_budgets import layer_weights, plan_by_layer
from .metrics import max_pool_keys, squared_attention, window_attention
from .planner import EvictionPlan, evictable_mask, plan_uniform, plan_variable
from .policies import POLICIES


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

    def block_ids(self) -> torch.Tensor:
        """[L, H, blocks] ids of the blocks covering the widest head."""
        return self.ids[:, :, : -(-self.slots.shape[2] // self.table.block_size)]


@dataclass
class ObservationWindow:
    """The request's most recent queries, per layer (after RoPE)."""

    queries: torch.Tensor  # [L, W, Hq, D]
    positions: torch.Tensor  # [W] token positions, -1 where empty


def keep_best(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Protect (score +inf) each head's ``count`` best-scored KVs, so a single
    ranking across heads cannot strip any head below that floor."""
    scores = torch.as_tensor(scores)
    ranked = torch.where(torch.isfinite(scores), scores, -torch.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    best = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    best.scatter_(-1, order[..., :count], True)
    return torch.where(best, torch.inf, scores)


def make_plan(settings, scores, positions, lens, num_tokens: int, target_tokens: int,
              block_size: int, preference: np.ndarray | None = None
              ) -> EvictionPlan | None:
    """Which blocks of one request go, by its policy; None if nothing may go.

    ``scores`` and ``positions`` are ``[L, H, M]`` per logical slot, ``lens``
    ``[L, H]`` (torch on any device, or numpy); ``num_tokens`` counts the
    protected window back, ``target_tokens`` sizes the kept target. The
    trigger tests plan with it exactly as the engine does.
    """
    policy = POLICIES[settings.policy]
    sinks = max(settings.sinks, policy.min_sinks)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    lens = torch.as_tensor(lens, dtype=torch.int64, device=scores.device)
    evictable = evictable_mask(torch.as_tensor(positions, device=scores.device), lens,
                               num_tokens, settings.protected_window, sinks)
    scores = torch.where(evictable, scores, torch.inf)
    budget = eviction_budget(settings, lens, evictable, target_tokens)
    if budget <= 0:
        return None
    heads = lens.numel()
    if policy.layer_budgets is not None:
        weights = layer_weights(policy.layer_budgets, len(lens), preference)
        target = kept_target(settings, target_tokens, heads)
        return plan_by_layer(scores, lens, evictable, target, weights,
                             block_size, policy.variable)
    if policy.variable:
        if settings.head_floor > 0:
            average = (int(lens.sum()) - budget) / heads
            scores = keep_best(scores, math.ceil(settings.head_floor * average))
        return plan_variable(scores, lens, block_size, budget)
    keep = math.ceil((int(lens.sum()) - budget) / heads)
    return plan_uniform(scores, lens, block_size, keep)


class Compressor:
    def __init__(self, pool: HeadBlockCache, kv_metric: torch.Tensor,
                 kv_position: torch.Tensor, layout: str, scale: float, seed: int = 0,
                 move_slots=apply_moves, sum_over_ranks=lambda values: values,
                 window_statistics=None):
        self.pool = pool
        self.slot_metric, self.slot_position = kv_metric, kv_position  # [P, bs]
        self.kv_metric = kv_metric.view(-1)
        self.kv_position = kv_position.view(-1)
        self.layout = layout
        self.scale = scale
        self.rng = torch.Generator(device=pool.kv.device).manual_seed(seed)
        self.move_slots = move_slots  # the attention ops' compaction
        # The ops' statistics kernel (reads the pool in place, all layers of
        # a request in one call); None: torch, one layer at a time.
        self.window_statistics = window_statistics
        # With tensor parallelism this rank holds some of the KV heads; CAKE's
        # layer statistics (sums over heads) are summed over all ranks so
        # every rank splits its budget over layers as one engine would.
        self.sum_over_ranks = sum_over_ranks

    def copy_blocks(self, sources: torch.Tensor, copies: torch.Tensor) -> None:
        """Copy whole head-blocks (K, V, metric, position): copy-on-compress
        of blocks the prefix cache shares with other requests."""
        self.pool.kv[copies] = self.pool.kv[sources]
        self.slot_metric[copies] = self.slot_metric[sources]
        self.slot_position[copies] = self.slot_position[sources]

    def compress(self, table: HeadTable, window: ObservationWindow | None, order,
                 reconstruct=None) -> int:
        """Evict and compact in place; returns the number of KVs evicted.
        ``window`` is None for policies that do not read it.

        ``reconstruct(table, slots)`` scores the KVs at ``slots`` [L, H, M]
        for the "reconstruction" metric (the worker's kvzip pass)."""
        settings = order.settings
        policy = POLICIES[settings.policy]
        if int(table.lens.max()) == 0:
            return 0
        request = self.request_kvs(table)
        lens, slots = request.lens, request.slots
        positions = self.kv_position[slots]

        metric = torch.zeros(slots.shape, dtype=torch.float64, device=slots.device)
        preference = None
        if policy.metric == "reconstruction":
            if reconstruct is None:
                raise RuntimeError(f"policy {policy.name} needs a reconstruction pass")
            metric = self._raise_metric(reconstruct(table, slots), slots, request.in_head)
        elif policy.metric is not None:
            metric, preference = self.update_metric(policy, request, window, order)
        scores = policy.scores(metric, positions, self.rng)
        plan = make_plan(settings, scores, positions, lens, order.num_tokens,
                         order.target_tokens, table.block_size, preference)
        if plan is None:
            return 0
        moves = slot_moves(table, plan, request.ids)
        if len(moves):
            self.move_slots(self.pool, moves, self.slot_metric, self.slot_position,
                            self.layout)
        table.truncate(plan.new_lens.cpu().numpy())
        return int((lens - plan.new_lens).sum())

    def request_kvs(self, table: HeadTable) -> RequestKVs:
        """The request's table on the pool's device, M its widest head."""
        device = self.kv_metric.device
        lens = torch.as_tensor(table.lens, dtype=torch.int64, device=device)
        logical = torch.arange(int(table.lens.max()), device=device)
        in_head = logical < lens[..., None]
        ids = torch.as_tensor(table.table, device=device).long()
        blocks = ids[:, :, logical // table.block_size]
        slots = torch.where(in_head, blocks * table.block_size + logical % table.block_size, 0)
        return RequestKVs(table, ids, lens, in_head, slots)

    def _raise_metric(self, fresh: torch.Tensor, slots: torch.Tensor,
                      in_head: torch.Tensor) -> torch.Tensor:
        """Raise the held KVs' stored metric to ``fresh`` [L, H, M] where
        higher (a best probability: a later pass re-reads only new tokens,
        and new KVs start at 0); returns the metric."""
        where = slots[in_head]
        self.kv_metric[where] = torch.maximum(self.kv_metric[where], fresh[in_head])
        return self.kv_metric[slots]

    def update_metric(self, policy, request: RequestKVs, window: ObservationWindow,
                      order) -> tuple[torch.Tensor, np.ndarray | None]:
        """Score each KV from this window's attention into its stored metric;
        returns the metric and, for CAKE, each layer's preference weight."""
        seen = window.positions >= 0
        queries = window.queries[:, seen]  # [L, W, Hq, D]
        query_positions = window.positions[seen]
        slots, lens, valid = request.slots, request.lens, request.in_head
        if policy.metric == "cake":
            return self._cake_metric(request, queries, query_positions, order.settings)
        if self.window_statistics is not None:
            fresh = self._kernel_statistics(request, queries, query_positions,
                                            per_group=False).sum_p2
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

    def _kernel_statistics(self, request: RequestKVs, queries: torch.Tensor,
                           query_positions: torch.Tensor, per_group: bool):
        """The ops' statistics kernel over every layer in one call. Layers are
        the kernel's requests, so each (layer, head) is one row and the sums
        ``[L, H, M]`` cover the GQA group; ``per_group`` makes each (layer,
        group head) a request instead, for sums ``[L, H, G, M]`` and
        entropies ``[L, G, H]`` over the keys older than the window (CAKE)."""
        num_layers, num_heads, width = request.slots.shape
        block_tables = request.block_ids().to(torch.int32)  # [L, H, nb]
        num_blocks = block_tables.shape[2]
        seq_lens = request.lens.to(torch.int32)
        num_queries = len(query_positions)
        if per_group:  # [L, W, H*G, D] -> [L*G, W, H, D]: G requests per layer
            group = queries.shape[2] // num_heads
            queries = queries.reshape(num_layers, num_queries, num_heads, group, -1)
            queries = queries.permute(0, 3, 1, 2, 4).reshape(
                num_layers * group, num_queries, num_heads, -1)
            block_tables = block_tables[:, None].expand(-1, group, -1, -1)
            seq_lens = seq_lens[:, None].expand(-1, group, -1)
        requests = queries.shape[0]
        positions = query_positions.view(1, -1).expand(requests, -1).contiguous()
        before = query_positions.min().expand(requests) if per_group else None
        stats = self.window_statistics(
            self.pool, queries.contiguous(), positions,
            block_tables.reshape(-1, num_blocks), seq_lens.reshape(-1), self.slot_position,
            self.scale, width, entropy_before=before)
        if not per_group:
            return type(stats)(*(x.view(num_layers, num_heads, *x.shape[1:]) for x in stats))
        sums = [x.view(num_layers, -1, num_heads, width).transpose(1, 2)
                for x in (stats.sum_p, stats.sum_p2)]
        return type(stats)(*sums, stats.entropy.view(num_layers, -1, num_heads))

    def _cake_metric(self, request: RequestKVs, queries: torch.Tensor,
                     query_positions: torch.Tensor, settings
                     ) -> tuple[torch.Tensor, np.ndarray]:
        """CAKE's indicator into the stored metric, and the layers' weights
        (host numbers, one per layer)."""
        slots, lens, valid = request.slots, request.lens, request.in_head
        num_layers = slots.shape[0]
        if self.window_statistics is not None:
            stats = self._kernel_statistics(request, queries, query_positions,
                                            per_group=True)
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
            stats = layer_statistics(sums[layer], self.kv_position[slots[layer]],
                                     lens[layer], query_positions, settings.cake_gamma)
            entropy[layer], shift[layer] = stats.entropy, stats.shift
            # Replaced, not added: a variance across queries does not add up
            # over windows, and CAKE judges KVs by the latest window alone (a
            # sum would also favour KVs that merely survived many compressions).
            self.kv_metric[slots[layer][valid[layer]]] = stats.indicator[valid[layer]]
        metric = self.kv_metric[slots]
        entropy, shift = self.sum_over_ranks(np.stack([entropy, shift]))
        return metric, preference_weights(entropy, shift, settings.cake_tau1,
                                          settings.cake_tau2)
