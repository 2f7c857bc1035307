"""CAKE's eviction indicator (mean + gamma x variance of the window's
attention, per KV) and its per-layer preference (attention entropy and
variance) for a ``PerLayer("preference")`` allocation; the maths is in
``compression/cake.py``."""

from __future__ import annotations

from .base import Scored, Scorer, ScoringContext


class CakeIndicator(Scorer):
    name = "cake-indicator"
    reads_window = True
    per_group = True

    def score(self, context: ScoringContext) -> Scored:
        job = context.job
        metric, preference = context.compressor.window_metric.update(
            self, context.request, job.window, job.order, context.stats)
        return Scored(metric.double(), preference)
