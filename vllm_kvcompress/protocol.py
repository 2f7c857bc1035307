"""Messages between the scheduler (EngineCore) and the worker, one per step.

They ride as an extra attribute on vLLM's ``SchedulerOutput`` (pickled to the
worker process with it), so they are plain dataclasses of numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Attribute name on SchedulerOutput.
STEP_ATTR = "kv_compress_step"


@dataclass
class BlockGrant:
    """Head-block ids given to one request in one allocation.

    fresh: the request's tables start empty (new, or resumed after preemption).
    counts: ``[L, H]`` ids appended to each (layer, KV head).
    block_ids: the ids, heads in (layer, head) order.
    """

    fresh: bool
    counts: np.ndarray
    block_ids: np.ndarray


@dataclass
class HeadBooks:
    """The scheduler's view of one request, sent in debug mode for checking."""

    lens: np.ndarray
    nblocks: np.ndarray
    table: np.ndarray


@dataclass
class StepMessage:
    grants: dict[str, list[BlockGrant]] = field(default_factory=dict)
    # Debug mode only: the scheduler's books for every scheduled request,
    # after this step's allocation.
    expected: dict[str, HeadBooks] | None = None
