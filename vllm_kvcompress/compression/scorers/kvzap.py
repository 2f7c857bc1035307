"""KVzap: kvzip's scores predicted from the KVs themselves.

A trained linear model per layer (``vllm_kvcompress/kvzap``, fit by
``python -m vllm_kvcompress.train_scorer``) maps the features of a token's
K and V in every KV head of a layer (``kvzap/features.py``) to one
predicted log kvzip score per head. Nothing is re-read: a KV is scored
once, at the first compression after it was written, and the prediction
stays in the stored metric (which compaction moves with the KV).

Why at compression and not inside the forward: the features are a function
of the stored K and V alone, so the prediction is the same either way, and
scoring here keeps the compiled forward and the cache-write op untouched
and costs nothing on steps that do not compress. The KVs not yet scored
are those written since the request's last compression; no eviction has
touched them, so every head holds all of them, at its tail, in position
order, which lines up the heads' features of one token.
"""

from __future__ import annotations

import torch

from ...kvzap.features import token_features
from ...kvzap.scorer_file import SCORER_FLAG, LearnedScorer, ScorerFileError
from .base import Scored, Scorer, ScoringContext


class LearnedScores:
    """The engine's copy of a trained scorer and how far each request's
    KVs have been scored."""

    def __init__(self, scorer: LearnedScorer, device: torch.device):
        self.weights = scorer.weights.to(device)  # [L, F, H]
        self.bias = scorer.bias.to(device)  # [L, H]
        self.rotary = scorer.rotary
        self.path = scorer.path
        self.scored: dict[str, int] = {}  # request -> positions below it scored

    def check(self, num_layers: int, num_heads: int, head_dim: int, rotary) -> None:
        """Refuse a scorer whose shapes or key features do not fit the
        engine's model (the start-up check compared configs; this compares
        what the worker really runs)."""
        from ...kvzap.features import key_features

        width = num_heads * (key_features(torch.zeros(1, head_dim), rotary).shape[-1]
                             + head_dim)
        wanted = (num_layers, width, num_heads)
        if tuple(self.weights.shape) != wanted or rotary != self.rotary:
            raise ScorerFileError(
                f"{SCORER_FLAG} {self.path}: weights {tuple(self.weights.shape)} with "
                f"rotary {self.rotary}, but this model needs {wanted} with rotary "
                f"{rotary}; train a scorer for it (python -m "
                "vllm_kvcompress.train_scorer).")

    def drop(self, req_id: str) -> None:
        """The request finished or lost its KVs (preempted)."""
        self.scored.pop(req_id, None)

    def predict(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Predicted log kvzip scores [L, H, N] of N tokens whose K and V
        in every head are ``keys`` / ``values`` [L, H, N, D]."""
        out = torch.empty(keys.shape[:3], dtype=torch.float32, device=keys.device)
        for layer in range(keys.shape[0]):
            features = token_features(keys[layer], values[layer], self.rotary)
            out[layer] = (features @ self.weights[layer] + self.bias[layer]).T
        return out

    def score_new(self, req_id: str, pool, layout: str, metric: torch.Tensor,
                  request, positions: torch.Tensor) -> None:
        """Write the predictions of the request's KVs written since its
        last compression into ``metric`` (the flat per-slot metric)."""
        start = self.scored.get(req_id, 0)
        new = request.in_head & (positions >= start)
        counts = new.sum(-1)
        count = int(counts.max())
        if count == 0:
            return
        if bool((counts != count).any()):
            raise RuntimeError(f"kvzap: the heads of request {req_id} disagree on which "
                               "tokens are new since its last compression")
        layers, heads, _ = new.shape
        slots = request.slots[new].view(layers, heads, count)
        keys, values = pool.gather(slots, layout)
        metric[slots] = self.predict(keys, values)
        self.scored[req_id] = int(positions[new].max()) + 1


class Learned(Scorer):
    name = "learned"

    def score(self, context: ScoringContext) -> Scored:
        compressor, request = context.compressor, context.request
        learned = compressor.learned
        if learned is None:
            raise RuntimeError("kvzap needs a trained scorer (--kv-compress-scorer)")
        learned.score_new(context.job.req_id, compressor.pool, compressor.layout,
                          compressor.kv_metric, request, context.positions)
        return Scored(compressor.kv_metric[request.slots].double())
