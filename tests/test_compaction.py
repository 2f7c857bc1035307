"""Compaction of evicted heads in the real pool: after the moves every head
holds exactly its surviving (position, K, V, metric) in its first new_len
slots, no move crosses heads, and vLLM's C++ attention over the compacted
heads equals dense attention over the survivors."""

import numpy as np
import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_kvcompress.attention.ops import cpu as cpu_paged, torch_ref as torch_paged
from vllm_kvcompress.attention.metadata import HeadPagedMetadata
from vllm_kvcompress.attention.pool_view import HeadBlockCache
from vllm_kvcompress.attention.ops.cpu import key_layout as probe_layout
from vllm_kvcompress.attention.ops.moves import apply_moves
from vllm_kvcompress.compression.compaction import compaction_moves, slot_moves
from vllm_kvcompress.compression.planner import evictable_mask, plan_variable
from vllm_kvcompress.head_table import HeadTable

BS, D = 32, 32
# The stock CPU kernels write K transposed; torch_paged writes it row-major.
WRITERS = {"k_transposed": cpu_paged, "row_major": torch_paged}


def isa():
    return _get_attn_isa(torch.float32, BS, D, "auto")


def logical_slots(table, layer, head, count):
    logical = np.arange(count)
    return table.table[layer, head, logical // BS].astype(np.int64) * BS + logical % BS


def read_kv(pool, slots, layout):
    """K and V [n, D] at ``slots``, read straight from the block bytes."""
    halves = pool.kv.view(pool.num_head_blocks, 2, BS * D)
    blocks, offsets = torch.from_numpy(slots // BS), torch.from_numpy(slots % BS)
    if layout == "k_transposed":
        keys = halves[:, 0].view(-1, D, BS)[blocks, :, offsets]
    else:
        keys = halves[:, 0].view(-1, BS, D)[blocks, offsets]
    return keys, halves[:, 1].view(-1, BS, D)[blocks, offsets]


class Request:
    """A request whose heads hold ragged, position-shuffled histories."""

    def __init__(self, rng, layout, num_layers=2, num_heads=3):
        self.lens = rng.integers(1, 4 * BS, size=(num_layers, num_heads))
        self.lens[0, 0] = 2 * BS  # an exact multiple
        counts = -(-self.lens // BS)
        num_blocks = int(counts.sum()) + 3
        self.pool = HeadBlockCache.empty(num_blocks, BS, D, torch.float32)
        self.table = HeadTable(num_layers, num_heads, BS)
        ids = rng.permutation(num_blocks)[: counts.sum()].astype(np.int32)
        self.table.append_blocks(counts, ids)
        self.table.lens[:] = self.lens
        self.metric = torch.rand(num_blocks, BS)
        self.position = torch.full((num_blocks, BS), -1, dtype=torch.int32)
        self.width = int(self.lens.max())
        self.positions = np.stack([
            [rng.permutation(self.width) for _ in range(num_heads)]
            for _ in range(num_layers)])
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        shape = (num_layers, self.width, num_heads, D)
        self.keys = torch.randn(shape, generator=gen)
        self.values = torch.randn(shape, generator=gen)
        self._write(WRITERS[layout])

    def _write(self, writer):
        for layer in range(self.lens.shape[0]):
            slots = np.full((self.width, self.lens.shape[1]), -1, dtype=np.int64)
            for head, length in enumerate(self.lens[layer]):
                slots[:length, head] = logical_slots(self.table, layer, head, length)
                held = torch.from_numpy(slots[:length, head])
                pos = torch.from_numpy(self.positions[layer, head, :length])
                self.position[held // BS, held % BS] = pos.int()
            writer.write_cache(self.pool, self.keys[layer], self.values[layer],
                               torch.from_numpy(slots), isa())

    def heads(self):
        return np.ndindex(self.lens.shape)

    def contents(self, head, count, layout):
        """Rows (position, metric, K..., V...) of logical KVs < count, by position."""
        slots = logical_slots(self.table, *head, count)
        keys, values = read_kv(self.pool, slots, layout)
        blocks, offsets = torch.from_numpy(slots // BS), torch.from_numpy(slots % BS)
        rows = torch.cat([self.position[blocks, offsets, None].double(),
                          self.metric[blocks, offsets, None].double(),
                          keys.double(), values.double()], dim=1)
        return rows[rows[:, 0].argsort()]


def compress(request, rng):
    scores = rng.random(request.positions.shape)
    allowed = evictable_mask(request.positions, request.lens, request.width,
                             protected_window=4, num_sinks=1)
    scores[~allowed.numpy()] = np.inf
    max_evict = int(rng.integers(1, request.lens.sum()))
    return plan_variable(scores, request.lens, BS, max_evict)


@pytest.mark.parametrize("layout", sorted(WRITERS))
@pytest.mark.parametrize("seed", range(4))
def test_compaction_keeps_exactly_the_survivors(layout, seed):
    rng = np.random.default_rng(seed)
    request = Request(rng, layout)
    plan = compress(request, rng)
    evicted, new_lens = plan.evicted.numpy(), plan.new_lens.numpy()
    assert plan.evicted.any()
    before = {}
    for head in request.heads():
        length = int(request.lens[head])
        written = read_kv(request.pool, logical_slots(request.table, *head, length), layout)
        assert torch.equal(written[0], request.keys[head[0], :length, head[1]])
        assert torch.equal(written[1], request.values[head[0], :length, head[1]])
        rows = request.contents(head, length, layout)
        kept = ~evicted[head][:length]
        kept_positions = request.positions[head][:length][kept]
        before[head] = rows[np.isin(rows[:, 0].numpy(), kept_positions)]

    moves = slot_moves(request.table, plan)
    apply_moves(request.pool, moves, request.metric,
                request.position, layout)

    for head in request.heads():
        after = request.contents(head, int(new_lens[head]), layout)
        assert torch.equal(after, before[head]), head


def test_slot_moves_are_per_head_compaction_moves():
    rng = np.random.default_rng(7)
    request = Request(rng, "row_major", num_layers=3, num_heads=4)
    plan = compress(request, rng)
    evicted, new_lens = plan.evicted.numpy(), plan.new_lens.numpy()
    moves = slot_moves(request.table, plan)
    owner = {}
    for head in request.heads():
        for block in request.table.table[head][: request.table.nblocks[head]]:
            owner[int(block)] = head
    expected = []
    for head in request.heads():
        src, dst = compaction_moves(evicted[head], int(request.lens[head]))
        assert len(src) == len(dst)
        assert (dst < new_lens[head]).all() and (src >= new_lens[head]).all()
        assert not evicted[head][src].any() and evicted[head][dst].all()
        slots = logical_slots(request.table, *head, request.lens[head])
        expected.append(np.stack([slots[src], slots[dst]], axis=1))
    assert np.array_equal(moves.numpy(), np.concatenate(expected))
    assert moves.dtype == torch.int64
    for src, dst in moves.tolist():
        assert owner[src // BS] == owner[dst // BS]


def test_compaction_moves_example():
    evicted = np.array([0, 1, 1, 0, 0, 1, 0, 0], dtype=bool)  # new_len 5
    src, dst = compaction_moves(evicted, 8)
    assert src.tolist() == [6, 7] and dst.tolist() == [1, 2]
    src, dst = compaction_moves(np.zeros(4, dtype=bool), 4)
    assert src.size == dst.size == 0


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_attention_over_compacted_heads_matches_dense(layout):
    rng = np.random.default_rng(11)
    request = Request(rng, layout)
    plan = compress(request, rng)
    evicted, new_lens = plan.evicted.numpy(), plan.new_lens.numpy()
    survivors = {head: torch.from_numpy(~evicted[head][: request.lens[head]])
                 for head in request.heads()}
    moves = slot_moves(request.table, plan)
    apply_moves(request.pool, moves, layout=layout)

    num_layers, num_heads = request.lens.shape
    group = 2
    query = torch.randn(1, num_heads * group, D, generator=torch.Generator().manual_seed(3))
    meta = HeadPagedMetadata(
        pool=request.pool, num_actual_tokens=1, num_kv_heads=num_heads,
        block_tables=torch.from_numpy(request.table.table.copy()),
        seq_lens=plan.new_lens.to(torch.int32),
        query_start_loc=torch.arange(num_heads + 1, dtype=torch.int32),
        request_query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        head_major_rows=None, layer_index={})
    scale = D ** -0.5
    for layer in range(num_layers):
        output = torch.zeros_like(query)
        meta.layer_cache.clear()
        WRITERS[layout].attend(request.pool, meta, layer, query, output, scale, isa())
        for head in range(num_heads):
            length = request.lens[layer, head]
            keep = survivors[layer, head]
            keys = request.keys[layer, :length, head][keep].double()
            values = request.values[layer, :length, head][keep].double()
            q = query[0, head * group:(head + 1) * group].double()
            expected = torch.softmax(q @ keys.T * scale, dim=-1) @ values
            torch.testing.assert_close(output[0, head * group:(head + 1) * group].double(),
                                       expected, atol=1e-5, rtol=1e-5)


def test_probe_finds_the_transposed_key_layout():
    assert probe_layout(isa(), BS, D, torch.float32) == "k_transposed"
    assert probe_layout(_get_attn_isa(torch.float32, 64, 64, "auto"), 64, 64,
                        torch.float32) == "k_transposed"


def test_apply_moves_rejects_unknown_layout():
    pool = HeadBlockCache.empty(1, BS, D, torch.float32)
    with pytest.raises(ValueError, match="layout"):
        apply_moves(pool, torch.zeros(0, 2, dtype=torch.int64), layout="blocked")


def test_triton_moves_equal_torch_moves_on_the_engine_pool():
    """The Triton compaction kernel (interpreter) moves exactly what the
    torch moves do, on the engine's pool view (row-major K), with metric and
    position."""
    from vllm_kvcompress.attention.ops.triton import TritonOps
    from vllm_kvcompress_kernels.testing import triton_ready

    if not triton_ready()[0]:
        pytest.skip(triton_ready()[1])
    gen = torch.Generator().manual_seed(5)
    pools = [HeadBlockCache.empty(6, BS, D, torch.float32) for _ in range(2)]
    sides = [(torch.rand(6, BS, generator=gen), torch.randint(0, 999, (6, BS), generator=gen,
                                                              dtype=torch.int32))]
    sides.append(tuple(t.clone() for t in sides[0]))
    start = torch.randn(pools[0].kv.shape, generator=gen)
    for pool in pools:
        pool.kv.copy_(start)
    slots = torch.randperm(6 * BS, generator=gen)[:40]
    moves = torch.stack([slots[:20], slots[20:]], dim=1)
    apply_moves(pools[0], moves, *sides[0], layout="row_major")
    TritonOps().move_slots(pools[1], moves, *sides[1])
    assert torch.equal(pools[0].kv, pools[1].kv)
    assert torch.equal(sides[0][0], sides[1][0]) and torch.equal(sides[0][1], sides[1][1])
    assert not torch.equal(pools[0].kv, start)
