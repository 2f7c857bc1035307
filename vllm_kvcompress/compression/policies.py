"""Eviction policies: a scorer (how KVs are rated, ``scorers/``) and an
allocation (how the eviction is shared out, ``allocation.py``), plus the
first tokens a policy always keeps."""

from __future__ import annotations

from dataclasses import dataclass

from .allocation import EqualCount, GlobalRanking, PerLayer
from .scorers.base import Scorer
from .scorers.cake import CakeIndicator
from .scorers.kvzap import Learned
from .scorers.kvzip import Reconstruction
from .scorers.position import Oldest, Random
from .scorers.window import SquaredAttention


@dataclass(frozen=True)
class Policy:
    name: str
    scorer: Scorer
    allocation: object  # one of allocation.py's
    min_sinks: int = 0

    @property
    def reads_window(self) -> bool:
        """Scored from the observation window's attention."""
        return self.scorer.reads_window


POLICIES = {
    "kvcompress": Policy("kvcompress", SquaredAttention(), GlobalRanking()),
    "cake": Policy("cake", CakeIndicator(), PerLayer("preference", variable=True)),
    # Ada-KV's split: equal layer quotas, heads of a layer ranked against
    # each other; isolates what kvcompress's cross-layer ranking changes.
    "adakv": Policy("adakv", SquaredAttention(), PerLayer("equal", variable=True)),
    # KVzip: query-agnostic scores from re-reading the context, one ranking
    # across all layers and heads; the first 4 tokens kept as sinks.
    "kvzip": Policy("kvzip", Reconstruction(), GlobalRanking(), min_sinks=4),
    # KVzap: kvzip's scores predicted from the KVs, ranked as kvzip ranks.
    "kvzap": Policy("kvzap", Learned(), GlobalRanking(), min_sinks=4),
    "snapkv": Policy("snapkv", SquaredAttention(), EqualCount()),
    "pyramidkv": Policy("pyramidkv", SquaredAttention(), PerLayer("pyramid", variable=False)),
    "streamingllm": Policy("streamingllm", Oldest(), EqualCount(), min_sinks=4),
    "random": Policy("random", Random(), EqualCount()),
}
