"""The worker's persistent per-head tables follow vLLM's persistent batch.

Random sequences of the row operations vLLM's InputBatch performs (add,
clear, move, swap) interleaved with grants, token steps and compressions,
checked after every operation against one plain ``HeadTable`` per request
(the class the scheduler keeps its books with). With a separate device copy
(as on a GPU; here a second CPU copy) the copy the kernels read must equal
the host books after every operation too."""

import numpy as np
import pytest
import torch

from vllm_kvcompress.head_table import HeadTable
from vllm_kvcompress.protocol import BlockGrant, PoolBooksError
from vllm_kvcompress.worker.batch_tables import BatchHeadTables

LAYERS, HEADS, BS, ROWS = 3, 2, 4, 6


class Model:
    """The reference: per-request HeadTables and which row holds whom."""

    def __init__(self, rng, separate_device_copy=False):
        self.rng = rng
        self.tables = BatchHeadTables(LAYERS, HEADS, BS, ROWS, width=2,
                                      separate_device_copy=separate_device_copy)
        self.ref: dict[str, HeadTable] = {}
        self.rows: list[str | None] = [None] * ROWS
        self.next_id = 0
        self.next_block = 0

    def check(self):
        for req_id, ref in self.ref.items():
            ours = self.tables.snapshot(req_id)
            assert np.array_equal(ours.lens, ref.lens), req_id
            assert np.array_equal(ours.nblocks, ref.nblocks), req_id
            mask = np.arange(ref.table.shape[2]) < ref.nblocks[..., None]
            width = ref.table.shape[2]
            padded = np.zeros_like(ref.table)
            padded[:, :, : min(width, ours.table.shape[2])] = ours.table[:, :, :width]
            assert np.array_equal(padded[mask], ref.table[mask]), req_id
        for row, req_id in enumerate(self.rows):
            if req_id is not None:
                assert self.tables.row_of[req_id] == row
        self.check_device_copy()

    def check_device_copy(self):
        """What the kernels read: every batch row's lengths, and its table
        entries up to its block count."""
        tables = self.tables
        assert (tables.device_table is tables.table) != tables.mirrored
        assert torch.equal(tables.device_lens, tables.lens)
        held = torch.arange(tables.width) < tables.nblocks[..., None]
        assert torch.equal(tables.device_table[held], tables.table[held])

    def grant(self, req_id, fresh=False):
        counts = self.rng.integers(0, 3, size=(LAYERS, HEADS))
        ids = np.arange(self.next_block, self.next_block + counts.sum(), dtype=np.int32)
        self.next_block += int(counts.sum())
        return BlockGrant(fresh, counts.astype(np.int32), ids)

    def step(self):
        op = self.rng.integers(0, 7)
        free_rows = [r for r, q in enumerate(self.rows) if q is None]
        used_rows = [r for r, q in enumerate(self.rows) if q is not None]
        parked = [q for q in self.ref if q not in self.rows]
        if op == 0 and free_rows:  # a new request, or a parked one coming back
            row = int(self.rng.choice(free_rows))
            if parked and self.rng.random() < 0.5:
                req_id = str(self.rng.choice(parked))
            else:
                req_id = f"r{self.next_id}"
                self.next_id += 1
                self.ref[req_id] = HeadTable(LAYERS, HEADS, BS)
            self.rows[row] = req_id
            self.tables.add_row(row, req_id)
        elif op == 1 and used_rows:  # leaves the batch (alive, parked)
            row = int(self.rng.choice(used_rows))
            self.rows[row] = None
            self.tables.clear_row(row)
        elif op == 2 and used_rows and free_rows:
            src, tgt = int(self.rng.choice(used_rows)), int(self.rng.choice(free_rows))
            self.rows[tgt], self.rows[src] = self.rows[src], None
            self.tables.move_row(src, tgt)
        elif op == 3 and len(used_rows) >= 2:
            a, b = (int(x) for x in self.rng.choice(used_rows, 2, replace=False))
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            self.tables.swap_row(a, b)
        elif op == 4 and used_rows:  # grants, several per request sometimes
            grants = {}
            for row in used_rows:
                req_id = self.rows[row]
                grants[req_id] = [self.grant(req_id) for _ in range(self.rng.integers(1, 3))]
                for grant in grants[req_id]:
                    self.ref[req_id].append_blocks(grant.counts, grant.block_ids)
            self.tables.apply_grants(grants)
        elif op == 5 and used_rows == list(range(len(used_rows))) and used_rows:
            # A step over rows 0..R-1 (vLLM condenses before a step).
            room = min(int((r.nblocks * BS - r.lens).min())
                       for r in (self.ref[self.rows[i]] for i in used_rows))
            counts = self.rng.integers(0, room + 1, size=len(used_rows))
            expected = np.concatenate([
                self.ref[self.rows[i]].new_token_slots(int(n)) for i, n in
                zip(used_rows, counts)], axis=1)
            slots = self.tables.advance(counts)
            assert torch.equal(slots, torch.from_numpy(expected))
            for i, n in zip(used_rows, counts):
                self.ref[self.rows[i]].lens += n
        elif op == 6 and used_rows:  # a compression shrinks a request
            req_id = self.rows[int(self.rng.choice(used_rows))]
            table = self.tables.snapshot(req_id)
            new_lens = (table.lens * self.rng.random(table.lens.shape)).astype(np.int64)
            table.truncate(new_lens)
            self.tables.store_lengths(req_id, table)
            self.ref[req_id].truncate(new_lens)
        self.check()


@pytest.mark.parametrize("separate_device_copy", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_rows_follow_the_batch(seed, separate_device_copy):
    model = Model(np.random.default_rng(seed), separate_device_copy)
    for _ in range(300):
        model.step()


def test_finished_requests_are_forgotten():
    tables = BatchHeadTables(LAYERS, HEADS, BS, ROWS)
    tables.add_row(0, "a")
    tables.clear_row(0)  # parked
    tables.drop("a")
    tables.add_row(0, "a")  # the same id again starts empty
    assert int(tables.snapshot("a").nblocks.sum()) == 0


def test_a_grant_to_a_request_outside_the_batch_fails_loudly():
    tables = BatchHeadTables(LAYERS, HEADS, BS, ROWS)
    grant = BlockGrant(True, np.ones((LAYERS, HEADS), np.int32),
                       np.arange(LAYERS * HEADS, dtype=np.int32))
    with pytest.raises(PoolBooksError, match="not in the batch"):
        tables.apply_grants({"ghost": [grant]})


def test_too_many_tokens_for_the_granted_blocks_fail_loudly():
    tables = BatchHeadTables(LAYERS, HEADS, BS, ROWS)
    tables.add_row(0, "a")
    tables.apply_grants({"a": [BlockGrant(True, np.ones((LAYERS, HEADS), np.int32),
                                          np.arange(LAYERS * HEADS, dtype=np.int32))]})
    tables.advance(np.array([BS]))
    with pytest.raises(PoolBooksError, match="too short"):
        tables.advance(np.array([1]))
