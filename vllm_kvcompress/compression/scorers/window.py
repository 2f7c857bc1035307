"""KV-Compress's metric: squared attention of the observation window's
queries, summed over the window and the GQA group, accumulated in the
stored metric over a request's compressions (max-pooled over neighbours
after the prompt, as SnapKV does)."""

from __future__ import annotations

from .base import Scored, Scorer, ScoringContext


class SquaredAttention(Scorer):
    name = "squared-attention"
    reads_window = True

    def score(self, context: ScoringContext) -> Scored:
        job = context.job
        metric, _ = context.compressor.window_metric.update(
            self, context.request, job.window, job.order, context.stats)
        return Scored(metric.double())
