"""The head-block pool split over tensor-parallel ranks, and each worker's
slice of it, without vLLM. The gather over ranks runs on a real two-process
gloo group (the same backend vLLM's TP group uses for CPU tensors)."""

import multiprocessing
import socket

import numpy as np
import pytest

from vllm_kvcompress.head_table import HeadTable
from vllm_kvcompress.protocol import CompressReply, HeadBooks, PoolBooksError
from vllm_kvcompress.scheduler.pool import HeadBlockPool
from vllm_kvcompress.worker.rank_slice import RankSlice

L, H, BS, RANKS = 3, 4, 4, 2
PER_RANK = 60  # head-blocks of each rank
HL = H // RANKS


def slices():
    return [RankSlice(r, RANKS, L, HL, PER_RANK) for r in range(RANKS)]


def test_each_head_gets_ids_of_its_own_rank():
    pool = HeadBlockPool(PER_RANK * RANKS, L, H, BS, num_ranks=RANKS)
    assert pool.grow("a", 9)
    table = pool.tables["a"]
    assert (table.table[:, :HL, :3] < PER_RANK).all()
    assert (table.table[:, HL:, :3] >= PER_RANK).all()
    assert pool.free_by_rank.tolist() == [PER_RANK - 3 * L * HL] * RANKS
    assert pool.held_by("a").tolist() == [3 * L * HL] * RANKS
    pool.check_books()
    pool.free("a")
    assert pool.free_by_rank.tolist() == [PER_RANK] * RANKS
    pool.check_books()


def test_growth_waits_for_the_fullest_rank():
    """Rank 0's heads were compressed harder, so rank 1 fills first: a
    request that fits the pool's total but not rank 1 is refused, changing
    nothing."""
    pool = HeadBlockPool(PER_RANK * RANKS, L, H, BS, num_ranks=RANKS)
    assert pool.grow("a", 20)  # 5 blocks x 3 layers x 2 heads = 30 per rank
    lens = pool.tables["a"].lens.copy()
    lens[:, :HL] = 4  # rank 0 keeps one block per head
    pool.shrink("a", lens)
    assert pool.free_by_rank.tolist() == [PER_RANK - 6, PER_RANK - 30]
    before = pool.free_by_rank
    # 6 blocks per head = 36 per rank: 54 free on rank 0, only 30 on rank 1.
    assert pool.blocks_to_grow("b", 24).tolist() == [36, 36]
    assert pool.num_free >= 72
    assert not pool.grow("b", 24)
    assert pool.free_by_rank.tolist() == before.tolist() and "b" not in pool.tables
    assert pool.grow("b", 20)  # 30 per rank fits both
    pool.check_books()


def test_books_check_catches_an_id_of_another_rank():
    pool = HeadBlockPool(PER_RANK * RANKS, L, H, BS, num_ranks=RANKS)
    pool.grow("a", 4)
    pool.grow("b", 4)
    # Swap a rank-0 id of "a" with a rank-1 id of "b": no id is lost or
    # doubled, but each now sits in the other rank's head.
    a, b = pool.tables["a"].table, pool.tables["b"].table
    a[0, 0, 0], b[0, HL, 0] = b[0, HL, 0], a[0, 0, 0]
    with pytest.raises(PoolBooksError, match="another rank"):
        pool.check_books()


@pytest.mark.parametrize("num_ranks", [1, RANKS])
def test_rank_tables_mirror_the_scheduler_under_random_traffic(num_ranks):
    """Grants cut per rank rebuild exactly each rank's columns of the
    scheduler's tables, with local ids, while requests grow, shrink unevenly
    across heads and ranks, and leave (one rank: the worker's copy is the
    scheduler's table)."""
    rng = np.random.default_rng(0)
    per_rank, heads = PER_RANK * RANKS * 4 // num_ranks, H // num_ranks
    pool = HeadBlockPool(per_rank * num_ranks, L, H, BS, num_ranks=num_ranks)
    ranks = [RankSlice(r, num_ranks, L, heads, per_rank) for r in range(num_ranks)]
    workers = [dict() for _ in ranks]
    tokens: dict[str, int] = {}
    for step in range(300):
        req = f"r{rng.integers(6)}"
        if req in tokens and rng.random() < 0.15:
            pool.free(req)
            tokens.pop(req)
            for tables in workers:
                tables.pop(req)
        elif req in tokens and rng.random() < 0.2:
            lens = pool.tables[req].lens
            pool.shrink(req, rng.integers(0, lens + 1))  # per head, so per rank
            for rank, tables in zip(ranks, workers):
                tables[req].truncate(pool.tables[req].lens[:, rank.heads])
        else:
            target = tokens.get(req, 0) + int(rng.integers(1, 11))
            if pool.grow(req, target):
                tokens[req] = target
        grants = pool.take_grants()
        for rank, tables in zip(ranks, workers):
            for req_id, request_grants in rank.local_grants(grants).items():
                for grant in request_grants:
                    if grant.fresh:
                        tables[req_id] = HeadTable(L, rank.num_kv_heads, BS)
                    tables[req_id].append_blocks(grant.counts, grant.block_ids)
            for req_id, table in tables.items():  # the worker's lengths advance
                table.lens = pool.tables[req_id].lens[:, rank.heads].copy()
        pool.check_books()
        for rank, tables in zip(ranks, workers):
            assert set(tables) == set(pool.tables)
            for req_id, table in pool.tables.items():
                books = rank.local_books(HeadBooks(table.lens, table.nblocks, table.table))
                ours = tables[req_id]
                assert np.array_equal(ours.nblocks, books.nblocks)
                mask = np.arange(books.table.shape[2]) < books.nblocks[..., None]
                assert np.array_equal(_pad(ours.table, books.table.shape[2])[mask],
                                      books.table[mask])
                assert ((books.table[mask] >= 0) & (books.table[mask] < rank.num_head_blocks)).all()


def _pad(table: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros(table.shape[:2] + (max(width, table.shape[2]),), table.dtype)
    out[:, :, : table.shape[2]] = table
    return out[:, :, :width]


def _gather_on_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=RANKS)
    me = RankSlice(rank, RANKS, L, HL, PER_RANK, group=dist.group.WORLD)
    reply = CompressReply(seconds=0.5 + rank)
    for i, req_id in enumerate(["x", "y"]):
        reply.new_lens[req_id] = np.full((L, HL), 10 * rank + i) + np.arange(L)[:, None]
        reply.evicted[req_id] = 100 * (rank + 1) + i
    whole = me.gather_reply(reply)
    summed = me.sum_over_ranks(np.array([[1.0, 2.0], [rank, 0.25]]))
    queue.put((rank, whole, summed))
    dist.destroy_process_group()


def test_gather_reply_and_sum_over_a_real_gloo_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_gather_on_rank, args=(r, port, queue))
             for r in range(RANKS)]
    for proc in procs:
        proc.start()
    results = dict((rank, (whole, summed)) for rank, whole, summed in
                   (queue.get(timeout=120) for _ in procs))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for whole, summed in results.values():
        assert whole.seconds == 1.5  # the slowest rank
        for i, req_id in enumerate(["x", "y"]):
            want = np.concatenate([np.full((L, HL), 10 * r + i) + np.arange(L)[:, None]
                                   for r in range(RANKS)], axis=1)
            assert np.array_equal(whole.new_lens[req_id], want)
            assert whole.evicted[req_id] == 100 + i + 200 + i
        assert summed.tolist() == [[2.0, 4.0], [1.0, 0.5]]
