"""Prefix caching over the head-block pool.

vLLM hashes every full token block of a request's prompt (a chain: each
hash covers all tokens before it). Here one hash maps to the L x H
head-blocks that hold that token block in every layer and KV head, as long
as no head of it was compressed. A later request with the same prefix puts
those ids into its own tables and skips computing them, as stock vLLM does
with token blocks.

An entry is held by every request whose tables contain its ids (the request
that wrote it, and every request that hit it); an entry nobody holds stays
cached and reusable until the pool needs its memory, least recently
released first (vLLM's LRU order). Plain numpy; no vLLM types.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np


class PrefixCache:
    def __init__(self, num_head_blocks: int):
        self.ids: dict[Hashable, np.ndarray] = {}  # hash -> [L, H] head-block ids
        self.holders: dict[Hashable, int] = {}
        # Entries nobody holds, least recently released first.
        self.idle: OrderedDict[Hashable, None] = OrderedDict()
        self.cached = np.zeros(num_head_blocks, dtype=bool)  # id -> in an entry
        self.held: dict[str, list[Hashable]] = {}  # request -> entries, in order

    def __len__(self) -> int:
        return len(self.ids)

    def longest_hit(self, hashes: Sequence[Hashable], max_blocks: int) -> list[Hashable]:
        """The cached hashes that start ``hashes``, at most ``max_blocks``."""
        hit = []
        for block_hash in hashes[:max_blocks]:
            if block_hash not in self.ids:
                break
            hit.append(block_hash)
        return hit

    def hold(self, req_id: str, hashes: Sequence[Hashable]) -> np.ndarray:
        """``req_id`` takes the entries ``hashes``; their ids ``[k, L, H]``."""
        for block_hash in hashes:
            self.holders[block_hash] += 1
            self.idle.pop(block_hash, None)
        self.held.setdefault(req_id, []).extend(hashes)
        return np.stack([self.ids[h] for h in hashes])

    def register(self, req_id: str, block_hash: Hashable, ids: np.ndarray) -> bool:
        """Cache the head-blocks ``ids [L, H]`` that ``req_id`` just wrote;
        False if that hash is cached already (the ids stay the request's own)."""
        if block_hash in self.ids:
            return False
        self.ids[block_hash] = ids.copy()
        self.holders[block_hash] = 1
        self.cached[ids] = True
        self.held.setdefault(req_id, []).append(block_hash)
        return True

    def release(self, req_id: str) -> None:
        """``req_id`` gives back every entry it held; deepest blocks first, so
        they are reclaimed before the prefixes other requests may share."""
        for block_hash in reversed(self.held.pop(req_id, [])):
            self.holders[block_hash] -= 1
            if self.holders[block_hash] == 0:
                self.idle[block_hash] = None

    def let_go(self, req_id: str, hashes: Sequence[Hashable]) -> None:
        """``req_id`` stops holding ``hashes`` (it copied them away)."""
        gone = set(hashes)
        self.held[req_id] = [h for h in self.held.get(req_id, []) if h not in gone]
        for block_hash in hashes:
            self.holders[block_hash] -= 1
            if self.holders[block_hash] == 0:
                self.idle[block_hash] = None

    def uncache(self, req_id: str, hashes: Sequence[Hashable]) -> None:
        """Forget entries only ``req_id`` holds: their ids become its own."""
        self.let_go(req_id, hashes)
        for block_hash in hashes:
            del self.idle[block_hash], self.holders[block_hash]
            self.cached[self.ids.pop(block_hash)] = False

    def reclaim(self, count: int) -> np.ndarray:
        """Drop the ``count`` least recently released idle entries; their ids."""
        dropped = []
        for _ in range(min(count, len(self.idle))):
            block_hash, _ = self.idle.popitem(last=False)
            ids = self.ids.pop(block_hash)
            del self.holders[block_hash]
            self.cached[ids] = False
            dropped.append(ids.reshape(-1))
        return np.concatenate(dropped) if dropped else np.zeros(0, np.int32)

    def idle_ids(self) -> np.ndarray:
        if not self.idle:
            return np.zeros(0, np.int32)
        return np.concatenate([self.ids[h].reshape(-1) for h in self.idle])

    def check(self) -> str | None:
        """What is inconsistent, or None."""
        counted: dict[Hashable, int] = {}
        for hashes in self.held.values():
            for block_hash in hashes:
                counted[block_hash] = counted.get(block_hash, 0) + 1
        for block_hash in self.ids:
            if counted.get(block_hash, 0) != self.holders[block_hash]:
                return f"prefix entry {block_hash!r} has a wrong holder count"
            if (self.holders[block_hash] == 0) != (block_hash in self.idle):
                return f"prefix entry {block_hash!r} idle state is wrong"
        if set(counted) - set(self.ids):
            return "a request holds a prefix entry that is not cached"
        return None
