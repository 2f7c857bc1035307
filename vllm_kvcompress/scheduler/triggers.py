"""When a request is compressed: the scheduler's decision, made once per step.

A compression costs a scoring pass over every KV of the request, so it is
ordered only when it can free memory:
- once its prompt (or, after a preemption, its prompt and output) has been
  read;
- every ``--kv-compress-interval`` steps, if set;
- with ``--kv-compress-cascade``, between prompt chunks, once the request is
  a block above its final budget;
- when the pool could not cover one more step of every running request, if
  the request's plan would free at least one block per head on average and
  it was not compressed in the last ``block_size`` steps.
The excess counted is what a plan can actually reach: KVs above the kept
target and outside the protected window and the sinks.
"""

from __future__ import annotations

import numpy as np

from ..compression.budget import kept_target
from ..compression.policies import POLICIES
from ..protocol import CompressOrder


def reachable_excess(settings, lens: np.ndarray, target_tokens: int) -> int:
    """KVs a compression of a request whose heads hold ``lens`` KVs could
    evict now: above its kept target, and never the KVs that no plan may
    take (each head's protected window and sinks)."""
    sinks = max(settings.sinks, POLICIES[settings.policy].min_sinks)
    fixed = int(np.minimum(lens, settings.protected_window + sinks).sum())
    target = max(kept_target(settings, target_tokens, lens.size), fixed)
    return int(lens.sum()) - target


class CompressionTriggers:
    def __init__(self, block_size: int, cascade: bool):
        self.block_size = block_size
        self.cascade = cascade
        # Step of each held request's last compression (absent: not yet
        # compressed since it was last given memory).
        self.last_compressed: dict[str, int] = {}
        self.step = 0
        self.low_memory_orders = 0

    def forget(self, req_id: str) -> None:
        """The request gave its memory back (finished, aborted, preempted)."""
        self.last_compressed.pop(req_id, None)

    def postpone(self, req_id: str, last: int | None) -> None:
        """The order just given cannot run this step (its shared blocks
        cannot be copied yet): it stays due."""
        if last is None:
            self.last_compressed.pop(req_id, None)
        else:
            self.last_compressed[req_id] = last

    def order(self, req_id: str, settings, lens: np.ndarray, num_computed: int,
              num_tokens: int, running_dry: bool) -> CompressOrder | None:
        """Whether ``req_id`` compresses after this step, whose tokens bring
        it to ``num_computed`` of its ``num_tokens`` (prompt, plus output
        when it re-reads after a preemption)."""
        if not settings.evicts:
            return None
        if num_computed < num_tokens:  # still reading its prompt
            # Cascading: hold at most the final budget plus one chunk.
            if (self.cascade and reachable_excess(settings, lens, num_tokens)
                    >= self.block_size):
                return CompressOrder(settings, num_computed, after_prompt=False,
                                     target_tokens=num_tokens)
            return None
        last = self.last_compressed.get(req_id)
        due = last is None or (
            settings.interval > 0 and self.step - last >= settings.interval)
        if not due and running_dry and self.step - last >= self.block_size:
            due = reachable_excess(settings, lens, num_computed) >= self.block_size * lens.size
            self.low_memory_orders += due
        if not due:
            return None
        self.last_compressed[req_id] = self.step
        return CompressOrder(settings, num_computed, after_prompt=last is None,
                             target_tokens=num_computed)
