"""Messages between the scheduler (EngineCore) and the worker, one per step.

They ride as an extra attribute on vLLM's ``SchedulerOutput`` (pickled to the
worker process with it), so they are plain dataclasses of numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

class PoolBooksError(RuntimeError):
    """The head-block books do not balance, or the scheduler and the worker
    disagree about them (a bug; checked in debug mode)."""


# Attribute name on SchedulerOutput.
STEP_ATTR = "kv_compress_step"


@dataclass
class BlockGrant:
    """Head-block ids given to one request in one allocation.

    fresh: the request's tables start empty (new, or resumed after preemption).
    counts: ``[L, H]`` ids appended to each (layer, KV head).
    block_ids: the ids, heads in (layer, head) order.
    cached_tokens: with ``fresh``, tokens the request starts with (a prefix
        cache hit: the granted ids are shared blocks already written).
    """

    fresh: bool
    counts: np.ndarray
    block_ids: np.ndarray
    cached_tokens: int = 0


@dataclass
class HeadBooks:
    """The scheduler's view of one request, sent in debug mode for checking."""

    lens: np.ndarray
    nblocks: np.ndarray
    table: np.ndarray


@dataclass
class StepMessage:
    grants: dict[str, list[BlockGrant]] = field(default_factory=dict)
    compress: dict[str, "CompressOrder"] = field(default_factory=dict)
    # Debug mode only: the scheduler's books for every scheduled request,
    # after this step's allocation.
    expected: dict[str, HeadBooks] | None = None


@dataclass
class CompressOrder:
    """Compress one request after this step's forward.

    settings: the request's effective ``KVCompressConfig``.
    num_tokens: the request's token count once this step's tokens are in
        (the protected window is counted back from it).
    after_prompt: the prompt was completed in this step (first compression).
    target_tokens: the length the kept target is measured on: ``num_tokens``,
        or the whole prompt's when cascading between prompt chunks.
    copies: (source ids, copy ids) of the prefix-cached blocks the request
        holds: the worker copies each into a block of the request's own
        first (copy-on-compress), so compaction never writes a cached block.
    """

    settings: object
    num_tokens: int
    after_prompt: bool
    target_tokens: int
    copies: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class CompressReply:
    """Per-head lengths after eviction and compaction, by request."""

    new_lens: dict[str, np.ndarray] = field(default_factory=dict)
    evicted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # worker time spent on this step's compressions
    # Of that, the kvzip reconstruction passes, and the tokens they fed.
    reconstruction_seconds: float = 0.0
    reconstruction_tokens: int = 0


# Attribute name on ModelRunnerOutput.
REPLY_ATTR = "kv_compress_reply"
