"""The head-block pool: the one owner of physical head-block ids.

A head-block holds ``block_size`` KVs of ONE KV head of ONE layer. The pool
hands ids to requests head by head, takes them back when a request finishes,
is aborted or preempted, and records every grant so the worker can mirror the
tables (see ``protocol.StepMessage``). Plain numpy; no vLLM types.
"""

from __future__ import annotations

import numpy as np

from ..head_table import HeadTable
from ..protocol import BlockGrant, PoolBooksError


class HeadBlockPool:
    def __init__(
        self, num_head_blocks: int, num_layers: int, num_kv_heads: int, block_size: int
    ):
        self.num_head_blocks = num_head_blocks
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        # A stack: ids are popped from the end, low ids first.
        self._free = np.arange(num_head_blocks - 1, -1, -1, dtype=np.int32)
        self._num_free = num_head_blocks
        self.peak_held = 0  # high-water mark of held head-blocks
        self.tables: dict[str, HeadTable] = {}
        self._tokens: dict[str, int] = {}
        self._grants: dict[str, list[BlockGrant]] = {}

    # ------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_held(self) -> int:
        return self.num_head_blocks - self._num_free

    @property
    def usage(self) -> float:
        return self.num_held / self.num_head_blocks if self.num_head_blocks else 0.0

    @property
    def heads_per_token_block(self) -> int:
        """Head-blocks that one vLLM token block stands for (all layers, heads)."""
        return self.num_layers * self.num_kv_heads

    def held_by(self, req_id: str) -> int:
        table = self.tables.get(req_id)
        return int(table.nblocks.sum()) if table is not None else 0

    def blocks_to_grow(self, req_id: str, num_tokens: int) -> int:
        """Head-blocks ``req_id`` still needs to hold ``num_tokens`` tokens."""
        table = self.tables.get(req_id)
        if table is None:
            per_head = -(-num_tokens // self.block_size)
            return per_head * self.heads_per_token_block
        new_tokens = max(num_tokens - self._tokens[req_id], 0)
        return int(table.blocks_short(new_tokens).sum())

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
        total = int(counts.sum())
        if total > self._num_free:
            return False
        ids = self._free[self._num_free - total : self._num_free][::-1].copy()
        self._num_free -= total
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
        self._release(ids)
        return len(ids)

    def _release(self, ids: np.ndarray) -> None:
        self._free[self._num_free : self._num_free + len(ids)] = ids[::-1]
        self._num_free += len(ids)

    def free(self, req_id: str) -> int:
        """Return every head-block of ``req_id``; the number freed."""
        table = self.tables.pop(req_id, None)
        self._tokens.pop(req_id, None)
        self._grants.pop(req_id, None)
        if table is None:
            return 0
        ids = table.held_ids()
        self._release(ids)
        return len(ids)

    def _record_grant(
        self, req_id: str, fresh: bool, counts: np.ndarray, ids: np.ndarray
    ) -> None:
        grant = BlockGrant(fresh=fresh, counts=counts.astype(np.int32), block_ids=ids)
        self._grants.setdefault(req_id, []).append(grant)

    def take_grants(self) -> dict[str, list[BlockGrant]]:
        """The grants made since the last call (one step's worth), in order."""
        grants, self._grants = self._grants, {}
        return grants

    # ------------------------------------------------------------ checks
    def check_books(self) -> None:
        """Raise ``PoolBooksError`` unless free + held == pool, no id twice."""
        held = [t.held_ids() for t in self.tables.values()]
        held_ids = np.concatenate(held) if held else np.zeros(0, np.int32)
        free_ids = self._free[: self._num_free]
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
