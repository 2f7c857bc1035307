"""Which KVs of one request to evict, decided in whole head-blocks.

A head frees blocks from its tail only. Freeing its k-th block costs the KVs
of that block: ``hanging`` (the fill of its last block) for k = 1 and
``block_size`` after that, so freeing k blocks evicts its ``c_k`` lowest-
scored KVs. ``plan_variable`` is KV-Compress's selection: one ranking of every
(head, block) of the request, so heads with useless KVs give up more blocks.
``plan_uniform`` is the equal-count-per-head baseline. Plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EvictionPlan:
    # [L, H] int64: KVs each head keeps.
    new_lens: np.ndarray
    # [L, H, M] bool: logical KV i of head (l, h) is evicted.
    evicted: np.ndarray


def evictable_mask(positions: np.ndarray, lens: np.ndarray, seq_len: int,
                   protected_window: int, num_sinks: int) -> np.ndarray:
    """KVs that may be evicted: held, older than the protected recent window,
    and not attention sinks. Judged by token position, since compaction
    reorders logical indices."""
    held = np.arange(positions.shape[-1]) < lens[..., None]
    return (held & (positions < seq_len - protected_window)
            & (positions >= num_sinks))


def _hanging(lens: np.ndarray, block_size: int) -> np.ndarray:
    """KVs in each head's last block (0 for an empty head)."""
    rest = lens % block_size
    return np.where((rest == 0) & (lens > 0), block_size, rest)


def _rank_heads(scores: np.ndarray, lens: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: logical indices in ascending score order (ties: lower index
    first), the sorted scores, and how many scores are finite. Slots past a
    head's length sort last as +inf."""
    held = np.arange(scores.shape[-1]) < lens[..., None]
    padded = np.where(held, scores, np.inf)
    order = np.argsort(padded, axis=-1, kind="stable")
    ranked = np.take_along_axis(padded, order, axis=-1)
    return order, ranked, np.isfinite(ranked).sum(-1)


def _plan(order: np.ndarray, lens: np.ndarray, num_evicted: np.ndarray
          ) -> EvictionPlan:
    """Evict the ``num_evicted`` lowest-ranked KVs of each head."""
    chosen = np.arange(order.shape[-1]) < num_evicted[..., None]
    evicted = np.zeros(order.shape, dtype=bool)
    np.put_along_axis(evicted, order, chosen, axis=-1)
    return EvictionPlan(new_lens=(lens - num_evicted).astype(np.int64),
                        evicted=evicted)


def _evicted_for_blocks(freed: np.ndarray, hanging: np.ndarray,
                        block_size: int) -> np.ndarray:
    """``c_k``: KVs evicted by freeing ``freed`` tail blocks of each head."""
    return np.where(freed > 0, (freed - 1) * block_size + hanging, 0)


def plan_variable(scores: np.ndarray, lens: np.ndarray, block_size: int,
                  max_evict: int) -> EvictionPlan:
    """Free the cheapest blocks of the request, ranked over all heads, while
    the evicted KVs stay within ``max_evict``.

    A block's score is the largest score it evicts, i.e. the ``c_k``-th lowest
    of its head; blocks that would evict a protected (+inf) KV do not exist.
    """
    lens = np.asarray(lens, dtype=np.int64)
    order, ranked, finite = _rank_heads(scores, lens)
    hanging = _hanging(lens, block_size)
    flat_ranked = ranked.reshape(lens.size, -1)
    max_blocks = -(-int(lens.max(initial=0)) // block_size)

    # Every candidate block (flat head index, k), dropping those that
    # would reach a protected KV or do not exist.
    head, k = np.divmod(np.arange(lens.size * max_blocks), max(max_blocks, 1))
    k += 1
    evicts = _evicted_for_blocks(k, hanging.reshape(-1)[head], block_size)
    exists = (lens.reshape(-1)[head] > 0) & (evicts <= finite.reshape(-1)[head])
    head, k, evicts = head[exists], k[exists], evicts[exists]
    score = flat_ranked[head, evicts - 1]

    taken = np.lexsort((k, head, score))
    cost = np.where(k == 1, hanging.reshape(-1)[head], block_size)[taken]
    taken = taken[np.cumsum(cost) <= max_evict]
    # Each head's blocks come in k order, so the count taken is its k.
    freed = np.bincount(head[taken], minlength=lens.size)
    num_evicted = _evicted_for_blocks(freed.reshape(lens.shape), hanging, block_size)
    return _plan(order, lens, num_evicted)


def plan_uniform(scores: np.ndarray, lens: np.ndarray, block_size: int,
                 keep_per_head: int) -> EvictionPlan:
    """Free in each head the most tail blocks that still leave it at least
    ``keep_per_head`` KVs, evicting only finite-score ones."""
    lens = np.asarray(lens, dtype=np.int64)
    order, _, finite = _rank_heads(scores, lens)
    hanging = _hanging(lens, block_size)
    allowed = np.minimum(lens - keep_per_head, finite)
    freed = np.where((lens > 0) & (allowed >= hanging),
                     (allowed - hanging) // block_size + 1, 0)
    num_evicted = _evicted_for_blocks(freed, hanging, block_size)
    return _plan(order, lens, num_evicted)
