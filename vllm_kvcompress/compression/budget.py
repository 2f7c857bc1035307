"""How many KVs a request keeps: plain arithmetic shared by the scheduler
(when to compress, how much a request may hold), the start-up capacity check
and the worker's compressor."""

from __future__ import annotations

import math


def kept_target(settings, num_tokens: int, heads: int) -> int:
    """KVs a request of ``num_tokens`` tokens should keep over all its heads.
    Measured on its full length, so repeated compressions hold it near
    1/rate (or ``max_tokens`` per head on average) instead of shrinking it
    again and again."""
    if settings.max_tokens is not None:
        return settings.max_tokens * heads
    protected = min(num_tokens, settings.protected_window)
    compressible = (num_tokens - protected) * heads
    return math.ceil(compressible / settings.rate) + protected * heads


def eviction_budget(settings, lens, evictable, num_tokens: int) -> int:
    """How many KVs may go now (``lens`` [L, H] and ``evictable`` [L, H, M],
    numpy or torch)."""
    target = kept_target(settings, num_tokens, math.prod(lens.shape))
    return max(0, min(int(evictable.sum()), int(lens.sum()) - target))


def peak_tokens_per_head(settings, num_tokens: int, chunk: int, block_size: int) -> int:
    """The most KVs a head of a cascading request holds while its prompt of
    ``num_tokens`` is read: its average budget, one chunk, and one partly
    filled block."""
    budget = kept_target(settings, num_tokens, 1)
    return min(num_tokens, budget + chunk + block_size)
