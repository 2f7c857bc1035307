"""Worker-side compression of the requests a step orders: statistics of the
window queries -> policy scores -> (per-layer budgets) -> which blocks go ->
compaction -> new per-head lengths.

A step's requests share the launches that do not depend on one request's
plan: their window statistics go to the kernel in one call per kind, their
compaction moves in one call, and their new lengths to the host in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..attention.ops.moves import apply_moves
from ..attention.pool_view import HeadBlockCache
from ..head_table import HeadTable
from .allocation import Request
from .budget import eviction_budget
from .compaction import slot_moves
from .planner import EvictionPlan, evictable_mask
from .policies import POLICIES
from .scorers.base import ScoringContext
from .window_metric import ObservationWindow, RequestKVs, WindowMetric


@dataclass
class CompressionJob:
    """One request's compression in a step. ``window`` is None for policies
    that do not read it; ``reconstruct(table, slots)`` scores the KVs at
    ``slots`` [L, H, M] for kvzip (the worker's reconstruction pass);
    ``publish()``, called once those scores are stored and before
    compaction, shares them with the prefix-cached blocks the request
    copied."""

    table: HeadTable
    window: ObservationWindow | None
    order: object  # protocol.CompressOrder
    reconstruct: Callable | None = None
    publish: Callable | None = None
    req_id: str = ""  # the learned scorer remembers what it scored per request


def make_plan(settings, scores, positions, lens, num_tokens: int, target_tokens: int,
              block_size: int, preference: np.ndarray | None = None
              ) -> EvictionPlan | None:
    """Which blocks of one request go, by its policy's allocation; None if
    nothing may go.

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
    return policy.allocation.plan(Request(settings, scores, lens, evictable, budget,
                                          target_tokens, block_size, preference))


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
        self.rng = torch.Generator(device=pool.kv.device).manual_seed(seed)
        self.move_slots = move_slots  # the attention ops' compaction
        # kvzap's trainer installs a hook here that sees every kvzip pass.
        self.teacher = None
        # kvzap's trained scorer (scorers/kvzap.LearnedScores), if loaded.
        self.learned = None
        self.window_metric = WindowMetric(pool, kv_metric, kv_position, layout, scale,
                                          window_statistics, sum_over_ranks)

    def copy_blocks(self, sources: torch.Tensor, copies: torch.Tensor) -> None:
        """Copy whole head-blocks (K, V, position): copy-on-compress of
        blocks the prefix cache shares with other requests. The copies'
        metric starts at 0: a cached block's may hold kvzip scores kept for
        reuse, which no other policy's metric may start from (kvzip adopts
        them explicitly)."""
        self.pool.kv[copies] = self.pool.kv[sources]
        self.slot_metric[copies] = 0.0
        self.slot_position[copies] = self.slot_position[sources]

    def compress(self, table: HeadTable, window: ObservationWindow | None, order,
                 reconstruct=None) -> int:
        """Evict and compact one request in place; returns the number of KVs
        evicted (``CompressionJob`` explains the arguments)."""
        return self.compress_step([CompressionJob(table, window, order, reconstruct)])[0]

    def compress_step(self, jobs: list[CompressionJob]) -> list[int]:
        """Evict and compact every job's request in place (each by its own
        plan: one ranking per request); returns the KVs each evicted.

        Requests hold disjoint blocks (prefix-cached ones were copied
        first), so their moves can go in one compaction call after all plans.
        """
        device = self.kv_metric.device
        requests = [RequestKVs.of(job.table, device) if job.table.lens.any() else None
                    for job in jobs]
        stats = self.window_metric.step_statistics(
            [(POLICIES[job.order.settings.policy].scorer, request, job.window)
             for job, request in zip(jobs, requests)])
        plans, moves = {}, []
        for index, (job, request) in enumerate(zip(jobs, requests)):
            if request is None:
                continue
            plan = self._plan(job, request, stats[index])
            if plan is not None:
                plans[index] = plan
                moves.append(slot_moves(job.table, plan, request.ids))
        moves = torch.cat(moves) if moves else ()
        if len(moves):
            self.move_slots(self.pool, moves, self.slot_metric, self.slot_position,
                            self.layout)
        evicted = [0] * len(jobs)
        if plans:
            new_lens = torch.stack([plan.new_lens for plan in plans.values()]).cpu().numpy()
            for index, lens in zip(plans, new_lens):
                table = jobs[index].table
                evicted[index] = int(table.lens.sum() - lens.sum())
                table.truncate(lens)
        return evicted

    def _plan(self, job: CompressionJob, request: RequestKVs, stats) -> EvictionPlan | None:
        """Score one request's KVs by its policy and plan which blocks go."""
        settings = job.order.settings
        positions = self.kv_position[request.slots]
        scored = POLICIES[settings.policy].scorer.score(
            ScoringContext(self, job, request, positions, stats))
        return make_plan(settings, scored.scores, positions, request.lens,
                         job.order.num_tokens, job.order.target_tokens,
                         job.table.block_size, scored.preference)

    def raise_metric(self, fresh: torch.Tensor, slots: torch.Tensor,
                      in_head: torch.Tensor) -> torch.Tensor:
        """Raise the held KVs' stored metric to ``fresh`` [L, H, M] where
        higher (a best probability: a later pass re-reads only new tokens,
        and new KVs start at 0); returns the metric."""
        where = slots[in_head]
        self.kv_metric[where] = torch.maximum(self.kv_metric[where], fresh[in_head])
        return self.kv_metric[slots]
