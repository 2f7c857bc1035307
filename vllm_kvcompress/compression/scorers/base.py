"""What a scorer is: how a policy rates one request's held KVs.

A scorer turns what the compressor knows about a request (its held KVs in
the pool, their positions, the observation window, the worker's hooks)
into one score per held KV, lower evicted first; an ``Allocation``
(``compression/allocation.py``) then decides how many go from each head.
Scorers are stateless singletons; engine state they need (the stored
metric, kvzip's pass, kvzap's weights) lives on the compressor or the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..compressor import CompressionJob, Compressor
    from ..window_metric import RequestKVs


@dataclass
class ScoringContext:
    compressor: "Compressor"
    job: "CompressionJob"
    request: "RequestKVs"
    positions: torch.Tensor  # [L, H, M] token position of each logical slot
    stats: object = None  # the step's window statistics of this request (kernel path)


@dataclass
class Scored:
    scores: torch.Tensor  # [L, H, M] float64, lower goes first
    # Per-layer weights for a ``PerLayer("preference")`` allocation (CAKE).
    preference: np.ndarray | None = None


class Scorer:
    name = "scorer"
    # Reads the observation window's queries (the runner keeps them).
    reads_window = False
    # Window statistics per query head of the GQA group, not per KV head.
    per_group = False
    # Needs the worker's kvzip pass (``CompressionJob.reconstruct``).
    reconstructs = False

    def score(self, context: ScoringContext) -> Scored:
        raise NotImplementedError
