"""The head-block pool: the one owner of physical head-block ids.

A head-block holds ``block_size`` KVs of ONE KV head of ONE layer. The pool
hands ids to requests head by head, takes them back when a request finishes,
is aborted or preempted, and records every grant so the worker can mirror the
tables (see ``protocol.StepMessage``). Plain numpy; no vLLM types.

With tensor parallelism (``num_ranks`` > 1) the ids and heads are split in
equal slices, one per rank (``pool_shape.PoolShape``): every rank has its
own free stack, a head only ever gets ids of its own rank, and a request
grows only if every rank has room for its part.
"""

from __future__ import annotations

import numpy as np

from ..head_table import HeadTable, replace_ids
from ..protocol import BlockGrant, PoolBooksError
from .prefix_cache import PrefixCache


class NoRoomToCopy(RuntimeError):
    """A compression must wait: its shared blocks cannot be copied yet."""


class HeadBlockPool:
    def __init__(
        self, num_head_blocks: int, num_layers: int, num_kv_heads: int, block_size: int,
        num_ranks: int = 1,
    ):
        if num_head_blocks % num_ranks or num_kv_heads % num_ranks:
            raise ValueError(
                f"{num_head_blocks} head-blocks and {num_kv_heads} KV heads do not "
                f"split over {num_ranks} ranks")
        self.num_head_blocks = num_head_blocks
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.num_ranks = num_ranks
        self.blocks_per_rank = num_head_blocks // num_ranks
        self.heads_per_rank = num_kv_heads // num_ranks
        # The rank of each (layer, head), in (layer, head) order.
        self._rank_of_head = np.tile(
            np.repeat(np.arange(num_ranks), self.heads_per_rank), num_layers)
        # One stack per rank: ids are popped from the end, low ids first.
        self._free = (np.arange(self.blocks_per_rank - 1, -1, -1, dtype=np.int32)[None, :]
                      + (np.arange(num_ranks, dtype=np.int32) * self.blocks_per_rank)[:, None])
        self._stacked = np.full(num_ranks, self.blocks_per_rank, dtype=np.int64)
        self.prefix = PrefixCache(num_head_blocks)
        # Copy-on-compress in flight: request -> (entries, source ids, copies).
        self._copying: dict[str, tuple[list, np.ndarray, np.ndarray]] = {}
        self._compressed: set[str] = set()  # never cached again
        self.peak_held = 0  # high-water mark of held head-blocks
        self.tables: dict[str, HeadTable] = {}
        self._tokens: dict[str, int] = {}
        self._grants: dict[str, list[BlockGrant]] = {}

    # ------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return int(self.free_by_rank.sum())

    @property
    def free_by_rank(self) -> np.ndarray:
        """Free head-blocks of each rank, cached ones nobody holds included."""
        return self._stacked + len(self.prefix.idle) * self.entry_blocks_per_rank

    @property
    def entry_blocks_per_rank(self) -> int:
        """Head-blocks one token block (a cache entry) takes on each rank."""
        return self.num_layers * self.heads_per_rank

    @property
    def num_cached(self) -> int:
        """Head-blocks in the prefix cache (held by requests or not)."""
        return len(self.prefix) * self.heads_per_token_block

    @property
    def num_held(self) -> int:
        return self.num_head_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_held / self.num_head_blocks if self.num_head_blocks else 0.0

    @property
    def heads_per_token_block(self) -> int:
        """Head-blocks that one vLLM token block stands for (all layers, heads)."""
        return self.num_layers * self.num_kv_heads

    def by_rank(self, per_head: np.ndarray) -> np.ndarray:
        """Sum an ``[L, H]`` array over each rank's heads: ``[ranks]``."""
        shape = (self.num_layers, self.num_ranks, self.heads_per_rank)
        return per_head.reshape(shape).sum(axis=(0, 2))

    def held_by(self, req_id: str) -> np.ndarray:
        """Head-blocks ``req_id`` holds on each rank."""
        table = self.tables.get(req_id)
        if table is None:
            return np.zeros(self.num_ranks, dtype=np.int64)
        return self.by_rank(table.nblocks)

    def blocks_to_grow(self, req_id: str, num_tokens: int, hits: list = ()) -> np.ndarray:
        """Head-blocks ``req_id`` still needs on each rank to hold
        ``num_tokens`` tokens; for a new request starting with the cached
        blocks ``hits``, those idle in the cache count too (they stop being
        free once held)."""
        table = self.tables.get(req_id)
        if table is None:
            per_head = -(-num_tokens // self.block_size) - len(hits)
            idle = sum(1 for h in hits if h in self.prefix.idle)
            return np.full(self.num_ranks, (per_head + idle) * self.entry_blocks_per_rank,
                           dtype=np.int64)
        new_tokens = max(num_tokens - self._tokens[req_id], 0)
        return self.by_rank(table.blocks_short(new_tokens))

    # ------------------------------------------------------------ changes
    def grow(self, req_id: str, num_tokens: int) -> bool:
        """Give every head of ``req_id`` room for ``num_tokens`` tokens in all.

        Returns False, changing nothing, if the pool is short.
        """
        table = self.tables.get(req_id)
        fresh = table is None
        if fresh:
            table = HeadTable(self.num_layers, self.num_kv_heads, self.block_size)
            seen = 0
        else:
            seen = self._tokens[req_id]
        new_tokens = num_tokens - seen
        if new_tokens < 0:
            raise PoolBooksError(
                f"request {req_id} asked for {num_tokens} tokens but already "
                f"holds {seen}"
            )
        counts = table.blocks_short(new_tokens)
        need = self.by_rank(counts)
        if (need > self.free_by_rank).any():
            return False
        ids = self._take(counts, need)
        self.peak_held = max(self.peak_held, self.num_held)
        table.append_blocks(counts, ids)
        table.lens += new_tokens
        self.tables[req_id] = table
        self._tokens[req_id] = num_tokens
        self._record_grant(req_id, fresh, counts, ids)
        return True

    def shrink(self, req_id: str, new_lens: np.ndarray) -> int:
        """Apply the worker's post-compaction lengths; the number freed."""
        table = self.tables.get(req_id)
        if table is None:  # finished or aborted since the order was sent
            return 0
        ids = table.truncate(new_lens)
        if self.prefix.cached[ids].any():
            raise PoolBooksError(
                f"compression of {req_id} let go of cached prefix blocks")
        self._release(ids)
        return len(ids)

    def _take(self, counts: np.ndarray, need: np.ndarray) -> np.ndarray:
        """Pop ``counts[l, h]`` ids for each head from its rank's stack; the
        ids in (layer, head) order."""
        short = int((need - self._stacked).max(initial=0))
        if short > 0:  # reclaim cached blocks nobody holds (whole entries)
            self._release(self.prefix.reclaim(-(-short // self.entry_blocks_per_rank)))
        ranks = np.repeat(self._rank_of_head, counts.reshape(-1))
        ids = np.empty(len(ranks), dtype=np.int32)
        for rank in np.flatnonzero(need):
            top = self._stacked[rank]
            taken = self._free[rank, top - need[rank] : top][::-1]
            ids[ranks == rank if self.num_ranks > 1 else slice(None)] = taken
            self._stacked[rank] -= need[rank]
        return ids

    def _release(self, ids: np.ndarray) -> None:
        ranks = ids // self.blocks_per_rank
        for rank in np.unique(ranks):
            mine = ids[ranks == rank]
            top = self._stacked[rank]
            self._free[rank, top : top + len(mine)] = mine[::-1]
            self._stacked[rank] += len(mine)

    def free(self, req_id: str) -> int:
        """Return every head-block of ``req_id``; the number freed."""
        table = self.tables.pop(req_id, None)
        self._tokens.pop(req_id, None)
        self._grants.pop(req_id, None)
        self.prefix.release(req_id)
        self._compressed.discard(req_id)
        copying = self._copying.pop(req_id, None)
        if copying is not None:  # copies reserved, never applied
            self._release(copying[2])
        if table is None:
            return 0
        ids = table.held_ids()
        self._release(ids[~self.prefix.cached[ids]])  # cached ones stay cached
        return len(ids)

    # ------------------------------------------------------------ prefixes
    def attach_prefix(self, req_id: str, hashes: list) -> None:
        """A new request starts with the cached blocks ``hashes`` (a prefix
        hit): their ids go into its tables, shared, and count as computed."""
        if req_id in self.tables:
            raise PoolBooksError(f"prefix hit for {req_id}, which already holds blocks")
        ids = self.prefix.hold(req_id, hashes)  # [k, L, H]
        table = HeadTable(self.num_layers, self.num_kv_heads, self.block_size)
        counts = np.full((self.num_layers, self.num_kv_heads), len(hashes))
        in_head_order = np.ascontiguousarray(ids.transpose(1, 2, 0)).reshape(-1)
        table.append_blocks(counts, in_head_order)
        tokens = len(hashes) * self.block_size
        table.lens += tokens
        self.tables[req_id] = table
        self._tokens[req_id] = tokens
        self._record_grant(req_id, True, counts, in_head_order, cached_tokens=tokens)

    def clear_prefix_cache(self) -> None:
        """Drop every idle cached block (``reset_prefix_cache``)."""
        self._release(self.prefix.reclaim(len(self.prefix.idle)))

    def register_prefix(self, req_id: str, hashes: list, num_tokens: int) -> None:
        """Cache ``req_id``'s full blocks among its first ``num_tokens``
        tokens (uncompressed: every head holds block j at column j); never
        once it was ordered to compress."""
        if req_id in self._compressed:
            return
        table = self.tables[req_id]
        first = len(self.prefix.held.get(req_id, ()))
        for j in range(first, min(num_tokens // self.block_size, len(hashes))):
            if not self.prefix.register(req_id, hashes[j], table.table[:, :, j]):
                # Same tokens cached by another request: later blocks chain
                # on this hash, so stop (vLLM keeps the first copy too).
                break

    def prepare_compression(self, req_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Before ``req_id`` compresses: no cached block may change. Its
        cached blocks get copies of its own, so they stay cached for later
        requests (copy-on-compress); when a rank lacks room for that, the
        entries only it holds are uncached instead (its own now) and only
        those other requests share are copied. Returns (source ids, copy
        ids) for the worker, or None; raises ``NoRoomToCopy`` (changing
        nothing) when even the shared ones do not fit."""
        hashes = self.prefix.held.get(req_id, [])
        if not self._fits(len(hashes)):
            alone = [h for h in hashes if self.prefix.holders[h] == 1]
            if not self._fits(len(hashes) - len(alone)):
                raise NoRoomToCopy(req_id)
            self.prefix.uncache(req_id, alone)
            hashes = self.prefix.held.get(req_id, [])
        self._compressed.add(req_id)
        if not hashes:
            return None
        counts = np.full((self.num_layers, self.num_kv_heads), len(hashes))
        sources = np.stack([self.prefix.ids[h] for h in hashes])  # [k, L, H]
        sources = np.ascontiguousarray(sources.transpose(1, 2, 0)).reshape(-1)
        copies = self._take(counts, np.full(self.num_ranks,
                                            len(hashes) * self.entry_blocks_per_rank))
        self.peak_held = max(self.peak_held, self.num_held)
        self._copying[req_id] = (list(hashes), sources, copies)
        return sources, copies

    def _fits(self, num_entries: int) -> bool:
        """Whether every rank has room for ``num_entries`` entries' copies."""
        return bool((num_entries * self.entry_blocks_per_rank <= self.free_by_rank).all())

    def finish_copies(self, req_id: str) -> None:
        """The worker copied ``req_id``'s shared blocks: its table now names
        the copies, and it no longer holds the shared entries."""
        copying = self._copying.pop(req_id, None)
        if copying is None:
            return
        shared, sources, copies = copying
        replace_ids(self.tables[req_id].table, sources, copies)
        self.prefix.let_go(req_id, shared)

    def _record_grant(
        self, req_id: str, fresh: bool, counts: np.ndarray, ids: np.ndarray,
        cached_tokens: int = 0,
    ) -> None:
        grant = BlockGrant(fresh=fresh, counts=counts.astype(np.int32), block_ids=ids,
                           cached_tokens=cached_tokens)
        self._grants.setdefault(req_id, []).append(grant)

    def take_grants(self) -> dict[str, list[BlockGrant]]:
        """The grants made since the last call (one step's worth), in order."""
        grants, self._grants = self._grants, {}
        return grants

    # ------------------------------------------------------------ checks
    def check_books(self) -> None:
        """Raise ``PoolBooksError`` unless every id is exactly one of: free,
        cached (in one prefix entry, held by any number of requests), or held
        by one request; and the prefix entries' holders add up."""
        problem = self.prefix.check()
        if problem:
            raise PoolBooksError(problem)
        held = [t.held_ids() for t in self.tables.values()]
        held_ids = np.concatenate(held) if held else np.zeros(0, np.int32)
        held_ids = held_ids[~self.prefix.cached[held_ids]]
        held_ids = np.concatenate([held_ids, *(c[2] for c in self._copying.values())])
        cached_ids = np.flatnonzero(self.prefix.cached).astype(np.int32)
        free_ids = np.concatenate([self._free[rank, : self._stacked[rank]]
                                   for rank in range(self.num_ranks)] + [cached_ids])
        if len(held_ids) + len(free_ids) != self.num_head_blocks:
            raise PoolBooksError(
                f"{len(free_ids)} free + {len(held_ids)} held != "
                f"{self.num_head_blocks} head-blocks"
            )
        seen = np.bincount(
            np.concatenate([held_ids, free_ids]).astype(np.int64),
            minlength=self.num_head_blocks,
        )
        if seen.max(initial=0) > 1 or len(seen) != self.num_head_blocks:
            twice = np.flatnonzero(seen > 1)[:5].tolist()
            raise PoolBooksError(f"head-block ids held twice: {twice}")
        if self.num_ranks > 1:
            for req_id, table in self.tables.items():
                held_mask = np.arange(table.table.shape[2]) < table.nblocks[..., None]
                owner = np.broadcast_to(
                    self._rank_of_head.reshape(table.nblocks.shape)[..., None],
                    held_mask.shape)
                if (table.table[held_mask] // self.blocks_per_rank != owner[held_mask]).any():
                    raise PoolBooksError(
                        f"request {req_id} holds head-blocks of another rank's memory")
