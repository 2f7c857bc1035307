"""Prefix caching over the head-block pool, without vLLM: hits share the
cached ids, holders are counted, idle entries are reclaimed least recently
released first, compression first copies the cached blocks it holds, and
the books balance with ids in several tables."""

import numpy as np
import pytest

from vllm_kvcompress.protocol import PoolBooksError
from vllm_kvcompress.scheduler.pool import HeadBlockPool, NoRoomToCopy

L, H, BS = 2, 2, 4


def prompt(pool: HeadBlockPool, req_id: str, hashes: list, num_tokens: int) -> None:
    """What the cache manager does for a new request: take the longest hit,
    grow to the prompt, cache its full blocks."""
    hits = pool.prefix.longest_hit(hashes, (num_tokens - 1) // BS)
    if hits:
        pool.attach_prefix(req_id, hits)
    assert pool.grow(req_id, num_tokens)
    pool.register_prefix(req_id, hashes, num_tokens)


def test_a_hit_shares_the_writers_ids_and_counts_as_computed():
    pool = HeadBlockPool(64, L, H, BS)
    prompt(pool, "a", ["x", "y", "z"], 12)  # three full blocks
    assert len(pool.prefix) == 3
    pool.take_grants()
    prompt(pool, "b", ["x", "y", "w"], 12)  # shares x, y; the last token recomputed
    a, b = pool.tables["a"], pool.tables["b"]
    assert np.array_equal(b.table[:, :, :2], a.table[:, :, :2])
    assert not np.isin(b.table[:, :, 2], a.table[:, :, :3]).any()
    first, rest = pool.take_grants()["b"]
    assert first.fresh and first.cached_tokens == 2 * BS
    assert first.counts.tolist() == [[2, 2], [2, 2]] and not rest.fresh
    # x, y, z, w are cached; 4 blocks x L x H ids, held 3 + 1 (b's own w).
    assert pool.num_cached == 4 * L * H and pool.num_held == 4 * L * H
    pool.check_books()


def test_released_entries_stay_cached_and_are_reclaimed_oldest_first():
    pool = HeadBlockPool(6 * L * H, L, H, BS)
    prompt(pool, "a", ["a1", "a2"], 9)  # 3 blocks per head: 2 cached, 1 own
    prompt(pool, "b", ["b1", "b2"], 9)
    pool.free("a")
    pool.free("b")
    assert pool.num_free == pool.num_head_blocks  # idle cache counts as free
    assert list(pool.prefix.idle) == ["a2", "a1", "b2", "b1"]  # deepest first
    pool.check_books()
    # 5 blocks per head: the free stack has 2, so 3 entries are reclaimed.
    assert pool.grow("c", 20)
    assert sorted(pool.prefix.ids) == ["b1"]
    pool.check_books()
    # A hit on an idle entry takes it out of the idle list.
    pool.free("c")
    prompt(pool, "d", ["b1", "d2"], 8)
    assert pool.prefix.holders["b1"] == 1 and "b1" not in pool.prefix.idle
    pool.check_books()


def test_books_catch_a_wrong_holder_count_and_a_compressed_cached_block():
    pool = HeadBlockPool(64, L, H, BS)
    prompt(pool, "a", ["x", "y"], 9)
    pool.prefix.holders["x"] += 1
    with pytest.raises(PoolBooksError, match="holder count"):
        pool.check_books()
    pool.prefix.holders["x"] -= 1
    with pytest.raises(PoolBooksError, match="cached prefix blocks"):
        pool.shrink("a", np.full((L, H), 2))


def test_reset_only_drops_idle_entries():
    pool = HeadBlockPool(64, L, H, BS)
    prompt(pool, "a", ["x", "y"], 9)
    prompt(pool, "b", ["u"], 5)
    pool.free("b")
    pool.clear_prefix_cache()
    assert sorted(pool.prefix.ids) == ["x", "y"]
    pool.check_books()


def test_copy_on_compress_leaves_the_cached_blocks_to_the_cache():
    pool = HeadBlockPool(64, L, H, BS)
    prompt(pool, "a", ["x", "y"], 9)
    prompt(pool, "b", ["x", "z"], 9)  # shares x
    sources, copies = pool.prepare_compression("a")
    a_ids = pool.tables["a"].table[:, :, :2].copy()
    assert sorted(sources.tolist()) == sorted(a_ids.reshape(-1).tolist())
    assert not np.isin(copies, pool.prefix.cached.nonzero()[0]).any()
    pool.check_books()  # copies reserved, not yet in the table
    pool.finish_copies("a")
    table = pool.tables["a"]
    assert not pool.prefix.cached[table.held_ids()].any()
    assert pool.prefix.holders == {"x": 1, "y": 0, "z": 1}  # y idle, still cached
    pool.register_prefix("a", ["x", "y", "w"], 12)  # compressed: never cached again
    assert "w" not in pool.prefix.ids
    pool.shrink("a", np.full((L, H), 2))  # in place, on its own blocks
    pool.check_books()
    pool.free("a")
    pool.free("b")
    assert pool.num_free == pool.num_head_blocks
    pool.check_books()


def test_without_room_only_shared_blocks_are_copied():
    pool = HeadBlockPool(6 * L * H, L, H, BS)
    prompt(pool, "a", ["x", "y"], 9)  # 3 blocks per head, x and y cached
    prompt(pool, "b", ["x", "z"], 9)  # hits x, 2 more per head: 1 left
    sources, copies = pool.prepare_compression("a")  # no room for 2 copies
    assert "y" not in pool.prefix.ids  # only a held it: now a's own
    assert len(sources) == L * H  # x, shared with b, is copied
    pool.finish_copies("a")
    assert pool.prefix.holders == {"x": 1, "z": 1}
    pool.check_books()


def test_a_compression_waits_when_shared_blocks_cannot_be_copied():
    pool = HeadBlockPool(5 * L * H, L, H, BS)
    prompt(pool, "a", ["x", "y"], 9)
    prompt(pool, "b", ["x", "z"], 9)  # the pool is full
    holders = dict(pool.prefix.holders)
    with pytest.raises(NoRoomToCopy):
        pool.prepare_compression("a")
    assert pool.prefix.holders == holders and "y" in pool.prefix.ids
    pool.check_books()
