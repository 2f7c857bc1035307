"""The head-block pool and the per-head tables, without vLLM."""

import numpy as np
import pytest

from vllm_kvcompress.protocol import PoolBooksError
from vllm_kvcompress.scheduler.pool import HeadBlockPool
from vllm_kvcompress.head_table import HeadTable

L, H, BS = 3, 2, 4


def test_grow_allocates_ceil_per_head_and_free_returns_all():
    pool = HeadBlockPool(100, L, H, BS)
    assert pool.blocks_to_grow("a", 9).tolist() == [3 * L * H]  # one rank
    assert pool.grow("a", 9)
    assert pool.held_by("a").tolist() == [3 * L * H] and pool.num_free == 100 - 18
    assert pool.blocks_to_grow("a", 12).tolist() == [0]  # the third block has room
    assert pool.blocks_to_grow("a", 13).tolist() == [L * H]
    pool.check_books()
    assert pool.free("a") == 18 and pool.num_free == 100
    pool.check_books()


def test_grow_refuses_without_changing_anything():
    pool = HeadBlockPool(10, L, H, BS)
    assert not pool.grow("a", 9)  # needs 18
    assert pool.num_free == 10 and "a" not in pool.tables
    assert pool.take_grants() == {}


def test_books_check_catches_a_double_grant():
    pool = HeadBlockPool(50, L, H, BS)
    pool.grow("a", 4)
    pool.grow("b", 4)
    pool.tables["b"].table[0, 0, 0] = pool.tables["a"].table[0, 0, 0]
    with pytest.raises(PoolBooksError, match="held twice"):
        pool.check_books()


def test_books_check_catches_a_lost_block():
    pool = HeadBlockPool(50, L, H, BS)
    pool.grow("a", 4)
    pool.tables["a"].nblocks[1, 1] = 0  # forgets one block
    with pytest.raises(PoolBooksError, match="free .* held"):
        pool.check_books()


def test_new_token_slots_follow_each_heads_own_blocks():
    table = HeadTable(1, 2, BS)
    table.append_blocks(np.array([[2, 1]]), np.array([7, 3, 9]))
    table.lens[:] = [[5, 1]]
    slots = table.new_token_slots(2)  # [L, tokens, H]
    # head 0: logical 5, 6 -> block 3 (its second), offsets 1, 2
    # head 1: logical 1, 2 -> block 9, offsets 1, 2
    assert slots[0].tolist() == [[3 * BS + 1, 9 * BS + 1], [3 * BS + 2, 9 * BS + 2]]
    with pytest.raises(RuntimeError, match="too short"):
        table.new_token_slots(4)
