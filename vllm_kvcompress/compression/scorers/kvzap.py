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
order, which lines up the heads' features of one token. Under tensor
parallelism each rank adds its heads' share of every head's prediction and
the ranks sum the shares (one small exchange per request compressed).
"""

from __future__ import annotations

import torch

from ...kvzap.features import token_features
from ...kvzap.scorer_file import SCORER_FLAG, LearnedScorer, ScorerFileError
from .base import Scored, Scorer, ScoringContext


class LearnedScores:
    """The engine's copy of a trained scorer and how far each request's
    KVs have been scored."""

    def __init__(self, scorer: LearnedScorer, device: torch.device,
                 heads: slice | None = None, sum_over_ranks=None):
        """``heads``: this rank's KV heads under tensor parallelism (default:
        all). A head's score reads every head of its layer, but a rank holds
        only its own; the model is linear, so each rank applies the weight
        rows of its heads' features to every head's output, and the partial
        sums, added over the ranks (``sum_over_ranks``, element-wise on a
        float array), are exactly the one-rank prediction."""
        self.path = scorer.path
        self.rotary = scorer.rotary
        self.total_heads = scorer.weights.shape[-1]
        self.heads = heads if heads is not None else slice(0, self.total_heads)
        self.sum_over_ranks = sum_over_ranks
        self.full_shape = tuple(scorer.weights.shape)  # [L, F, H]
        width = scorer.weights.shape[1] // self.total_heads  # one head's features
        rows = slice(self.heads.start * width, self.heads.stop * width)
        self.weights = scorer.weights[:, rows].to(device)  # [L, F_rank, H]
        self.bias = scorer.bias.to(device)  # [L, H]
        self.scored: dict[str, int] = {}  # request -> positions below it scored

    @property
    def split(self) -> bool:
        return self.heads != slice(0, self.total_heads)

    def check(self, num_layers: int, num_heads: int, head_dim: int, rotary) -> None:
        """Refuse a scorer whose shapes or key features do not fit the
        engine's model (the start-up check compared configs; this compares
        what the worker really runs). ``num_heads``: the model's KV heads,
        all ranks together."""
        from ...kvzap.features import key_features

        width = num_heads * (key_features(torch.zeros(1, head_dim), rotary).shape[-1]
                             + head_dim)
        wanted = (num_layers, width, num_heads)
        if self.full_shape != wanted or rotary != self.rotary:
            raise ScorerFileError(
                f"{SCORER_FLAG} {self.path}: weights {self.full_shape} with "
                f"rotary {self.rotary}, but this model needs {wanted} with rotary "
                f"{rotary}; train a scorer for it (python -m "
                "vllm_kvcompress.train_scorer).")

    def drop(self, req_id: str) -> None:
        """The request finished or lost its KVs (preempted)."""
        self.scored.pop(req_id, None)

    def predict(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Predicted log kvzip scores [L, H, N] of N tokens whose K and V
        in each of this rank's heads are ``keys`` / ``values`` [L, H, N, D]."""
        out = torch.empty((keys.shape[0], keys.shape[2], self.total_heads),
                          dtype=torch.float32, device=keys.device)  # [L, N, all heads]
        for layer in range(keys.shape[0]):
            features = token_features(keys[layer], values[layer], self.rotary)
            torch.matmul(features, self.weights[layer], out=out[layer])
        if self.split:
            summed = self.sum_over_ranks(out.cpu().numpy())
            out = torch.as_tensor(summed, dtype=torch.float32).to(keys.device)
        out = out + self.bias[:, None, :]
        return out[:, :, self.heads].transpose(1, 2)

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
