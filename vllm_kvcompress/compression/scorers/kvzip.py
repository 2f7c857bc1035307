"""KVzip's reconstruction scores: the worker's pass makes the model re-read
the context (``worker/reconstruction.py``) and each held KV is scored by the
best attention it gets; the stored metric keeps the best over passes."""

from __future__ import annotations

from .base import Scored, Scorer, ScoringContext


class Reconstruction(Scorer):
    name = "reconstruction"
    reconstructs = True

    def score(self, context: ScoringContext) -> Scored:
        job, compressor, request = context.job, context.compressor, context.request
        if job.reconstruct is None:
            raise RuntimeError("kvzip's scores need the worker's reconstruction pass")
        fresh = job.reconstruct(job.table, request.slots)
        if compressor.teacher is not None:  # training a learned scorer
            compressor.teacher(fresh, request.slots, request.in_head, context.positions)
        metric = compressor.raise_metric(fresh, request.slots, request.in_head)
        if job.publish is not None:
            job.publish()
        return Scored(metric.double())
