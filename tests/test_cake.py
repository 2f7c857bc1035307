"""CAKE and PyramidKV: layer statistics and the eviction indicator against
naive loops, layer budgets (exact sums, caps, floors, the pyramid), per-layer
plans that honour the budgets, and cascading top-k equal to one-shot."""

import math

import numpy as np
import pytest
import torch

from vllm_kvcompress.compression.cake import (
    layer_statistics as statistics_from_sums,
    preference_weights,
    window_sums,
)
from vllm_kvcompress.compression.layer_budgets import (
    allocate,
    plan_by_layer,
    pyramid_weights,
)
from vllm_kvcompress.compression.metrics import window_attention
from vllm_kvcompress.compression.planner import EvictionPlan, evictable_mask, plan_variable

SCALE = 0.4


def layer_statistics(probs, key_positions, lens, query_positions, gamma):
    """CAKE's statistics from window probabilities, as the torch path runs them."""
    return statistics_from_sums(window_sums(probs, key_positions, lens, query_positions),
                                key_positions, lens, query_positions, gamma)


def attention_case(seed, num_heads=3, group=2, width=16, dim=6):
    """Random keys and window queries; head 0 in position order, the others
    permuted and shorter (as after compaction), the last one shortest."""
    gen = torch.Generator().manual_seed(seed)
    seq_len, window = width + 4, 5
    query_positions = torch.arange(seq_len - window, seq_len)
    lens = torch.tensor([width, width - 3, width - 7][:num_heads])
    key_positions = torch.full((num_heads, width), 10_000)
    for h in range(num_heads):
        # Every head keeps the window's tokens and some older ones.
        older = torch.randperm(seq_len - window, generator=gen)[: int(lens[h]) - window]
        held = torch.cat([older.sort().values, query_positions])
        if h > 0:
            held = held[torch.randperm(len(held), generator=gen)]
        key_positions[h, : len(held)] = held
    keys = torch.randn(num_heads, width, dim, generator=gen)
    queries = torch.randn(window, num_heads, group, dim, generator=gen)
    return keys, key_positions, lens, queries, query_positions


def naive_probs(keys, key_positions, lens, queries, query_positions):
    """{(h, g, w): {key index: probability}} by a loop over visible keys."""
    probs = {}
    num_heads, group = queries.shape[1], queries.shape[2]
    for h in range(num_heads):
        for g in range(group):
            for w, qpos in enumerate(query_positions.tolist()):
                visible = [i for i in range(int(lens[h])) if key_positions[h, i] <= qpos]
                logits = [float(queries[w, h, g].double() @ keys[h, i].double()) * SCALE
                          for i in visible]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                probs[h, g, w] = {i: e / sum(exps) for i, e in zip(visible, exps)}
    return probs


def naive_statistics(case, gamma):
    keys, key_positions, lens, queries, query_positions = case
    probs = naive_probs(*case)
    num_heads, group, window = queries.shape[1], queries.shape[2], queries.shape[0]
    start = int(query_positions.min())

    def column(h, g, i):
        return [probs[h, g, w].get(i, 0.0) for w in range(window)]

    def variance(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    entropy = shift = 0.0
    indicator = np.zeros(keys.shape[:2])
    for h in range(num_heads):
        held = range(int(lens[h]))
        by_position = sorted(held, key=lambda i: int(key_positions[h, i]))
        for g in range(group):
            raw = {i: sum(column(h, g, i)) / window + gamma * variance(column(h, g, i))
                   for i in held}
            for i in held:
                if key_positions[h, i] < start:
                    entropy -= sum(p * math.log(p + 1e-10) for p in column(h, g, i))
                    shift += variance(column(h, g, i))
            for rank, i in enumerate(by_position):
                near = by_position[max(0, rank - 2): rank + 3]
                indicator[h, i] += sum(raw[j] for j in near) / 5 / group
    return entropy, shift, indicator


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [0.0, 200.0])
def test_layer_statistics_match_naive_loops(seed, gamma):
    case = attention_case(seed)
    keys, key_positions, lens, queries, query_positions = case
    probs = window_attention(keys, key_positions, lens, queries, query_positions, SCALE)
    stats = layer_statistics(probs, key_positions, lens, query_positions, gamma)
    entropy, shift, indicator = naive_statistics(case, gamma)
    assert stats.entropy == pytest.approx(entropy, rel=1e-5)
    assert stats.shift == pytest.approx(shift, rel=1e-4)
    np.testing.assert_allclose(stats.indicator.numpy(), indicator, rtol=1e-4, atol=1e-7)
    assert (stats.indicator[2, int(lens[2]):] == 0).all()  # padding scores nothing


def test_only_keys_older_than_the_window_count_for_entropy_and_shift():
    keys, key_positions, lens, queries, query_positions = attention_case(7)
    probs = window_attention(keys, key_positions, lens, queries, query_positions, SCALE)
    older = (key_positions < query_positions.min())[:, None, None, :]

    def stats(p):
        return layer_statistics(p, key_positions, lens, query_positions, 200.0)

    full, no_window, no_older = stats(probs), stats(probs * older), stats(probs * ~older)
    assert full.entropy > 0 and full.shift > 0
    assert (no_window.entropy, no_window.shift) == pytest.approx((full.entropy, full.shift))
    assert no_older.entropy == 0 and no_older.shift == 0


def test_single_query_window_has_no_shift():
    keys, key_positions, lens, queries, query_positions = attention_case(1)
    probs = window_attention(keys, key_positions, lens, queries[-1:],
                             query_positions[-1:], SCALE)
    stats = layer_statistics(probs, key_positions, lens, query_positions[-1:], 200.0)
    assert stats.shift == 0 and stats.entropy > 0
    assert torch.isfinite(stats.indicator).all()


@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.7, 1.9), (1.6, 0.4)])
def test_preference_weights_are_proportional_to_p(taus):
    rng = np.random.default_rng(0)
    entropy, shift = rng.uniform(1, 50, 6), rng.uniform(0.01, 2, 6)
    naive = [h ** (1 / taus[0]) * v ** (1 / taus[1]) for h, v in zip(entropy, shift)]
    weights = preference_weights(entropy, shift, *taus)
    np.testing.assert_allclose(weights, np.array(naive) / max(naive), rtol=1e-12)


def test_preference_weights_survive_overflow_and_zeros():
    # 1e3 ** 100 overflows a float64; the ratio of the two layers does not.
    weights = preference_weights(np.array([1e3, 5e2, 7.0]), np.array([1.0, 1.0, 0.0]),
                                 0.01, 1.0)
    np.testing.assert_allclose(weights, [1.0, 2.0 ** -100, 0.0])
    assert not preference_weights(np.zeros(3), np.ones(3), 1.0, 1.0).any()
    assert not preference_weights(np.full(2, np.nan), np.ones(2), 1.0, 1.0).any()


def reference_shares(weights, rest, room):
    """Real-valued shares by bisection on the water level: min(room, level *
    weight) over positive weights, then an even level over the rest."""
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)

    def fill(scale, level):
        return np.minimum(room, level * scale)

    shares = np.zeros(len(room))
    for scale in (weights, (weights == 0).astype(float)):
        need = rest - shares.sum()
        if need <= 0 or not (scale * (room > 0)).any():
            continue
        lo, hi = 0.0, 1.0
        while fill(scale, hi).sum() < need and hi < 1e18:
            hi *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fill(scale, mid).sum() < need else (lo, mid)
        shares = shares + fill(scale, hi)
    return shares


@pytest.mark.parametrize("seed", range(300))
def test_allocate_sums_exactly_within_floors_and_caps(seed):
    rng = np.random.default_rng(seed)
    num_layers = int(rng.integers(1, 7))
    caps = rng.integers(0, 200, num_layers)
    floors = np.minimum(caps, rng.integers(0, 40, num_layers))
    weights = rng.random(num_layers) * rng.choice([1e-3, 1.0, 1e6])
    weights[rng.random(num_layers) < 0.3] = 0.0
    if rng.random() < 0.2:
        weights[rng.integers(num_layers)] = rng.choice([np.nan, -1.0, np.inf])
    total = int(rng.integers(0, caps.sum() + 50))
    budgets = allocate(weights, total, floors, caps)
    assert budgets.dtype == np.int64
    assert budgets.sum() == min(max(total, floors.sum()), caps.sum())
    assert (floors <= budgets).all() and (budgets <= caps).all()
    shares = reference_shares(weights, budgets.sum() - floors.sum(), caps - floors)
    assert np.all(np.abs(budgets - floors - shares) < 1 + 1e-6)


def test_allocate_spreads_a_capped_layers_excess():
    # Layer 0 wants 3/4 of 100 but holds 30: the other 70 go 1:2 over the rest.
    budgets = allocate(np.array([3.0, 1 / 3, 2 / 3]), 100, np.zeros(3), np.array([30, 500, 500]))
    assert budgets.tolist() == [30, 23, 47]


def test_allocate_even_split_without_weights():
    assert allocate(np.zeros(4), 10, np.zeros(4), np.full(4, 9)).tolist() == [3, 3, 2, 2]
    assert allocate(np.array([np.nan]), 5, [2], [9]).tolist() == [5]
    assert allocate(np.ones(2), 7, [5, 5], [9, 9]).tolist() == [5, 5]  # floors win


@pytest.mark.parametrize("num_layers", [1, 2, 5, 32])
def test_pyramid_budgets_shrink_with_depth_and_sum_exactly(num_layers):
    weights = pyramid_weights(num_layers)
    assert weights.mean() == pytest.approx(1.0)
    for total in (num_layers * 64 + 3, num_layers * 1000 + 17):
        floors = np.full(num_layers, 32)
        budgets = allocate(weights, total, floors, np.full(num_layers, 10_000))
        assert budgets.sum() == total
        assert (np.diff(budgets) <= 0).all()
        if num_layers > 1:
            average = (total - floors.sum()) / num_layers
            assert budgets[-1] - 32 == pytest.approx(average / 20, abs=1)
            assert budgets[0] - 32 == pytest.approx(2 * average - average / 20, abs=1)


def plan_case(rng):
    """Positions held by each head (all protected ones, a random subset of
    the rest, in shuffled order), random scores."""
    bs = int(rng.choice([1, 2, 4, 8]))
    num_layers, num_heads = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    seq_len = int(rng.integers(10, 60))
    window, sinks = int(rng.integers(0, 6)), int(rng.integers(0, 3))
    lens = np.zeros((num_layers, num_heads), dtype=np.int64)
    rows = {}
    for lh in np.ndindex(num_layers, num_heads):
        middle = np.arange(sinks, seq_len - window)
        kept = rng.permutation(middle)[: rng.integers(0, len(middle) + 1)]
        protected = np.r_[np.arange(sinks), np.arange(seq_len - window, seq_len)]
        rows[lh] = rng.permutation(np.r_[protected, kept])
        lens[lh] = len(rows[lh])
    positions = np.full((num_layers, num_heads, int(lens.max())), -1)
    for lh, row in rows.items():
        positions[lh][: len(row)] = row
    evictable = evictable_mask(positions, lens, seq_len, window, sinks).numpy()
    scores = np.where(evictable, rng.random(positions.shape), np.inf)
    return scores, lens, evictable, bs


@pytest.mark.parametrize("variable", [True, False])
@pytest.mark.parametrize("seed", range(150))
def test_per_layer_plan_keeps_each_layer_within_a_block_per_head(seed, variable):
    rng = np.random.default_rng(seed)
    scores, lens, evictable, bs = plan_case(rng)
    num_heads = lens.shape[1]
    target = int(rng.integers(0, lens.sum() + 10))
    weights = rng.random(len(lens)) * (rng.random(len(lens)) < 0.8)
    plan = plan_by_layer(scores, lens, evictable, target, weights, bs, variable)
    plan = EvictionPlan(plan.new_lens.numpy(), plan.evicted.numpy())
    held = lens.sum(1)
    budgets = allocate(weights, target, held - evictable.sum((1, 2)), held)
    kept = plan.new_lens.sum(1)
    assert (budgets <= kept).all() and (kept < budgets + num_heads * bs).all()
    assert not (plan.evicted & ~evictable).any()
    assert np.array_equal(plan.new_lens, lens - plan.evicted.sum(-1))
    if not variable:  # an equal share per head, up to whole blocks
        share = budgets[:, None] // num_heads
        assert (plan.new_lens >= np.minimum(share, lens)).all()
        for layer in range(len(lens)):  # heads that gave up KVs kept alike
            cut = plan.new_lens[layer][plan.new_lens[layer] < lens[layer]]
            assert len(cut) == 0 or cut.max() - cut.min() <= bs


@pytest.mark.parametrize("seed", range(50))
def test_cascading_top_k_equals_one_shot(seed):
    """Compressing to a fixed budget after every chunk of KVs (scores fixed)
    keeps what one compression at the end keeps: evicted KVs are never among
    the best ``budget`` of any superset. Block size 1, so the ranking over
    heads is a plain top-k."""
    rng = np.random.default_rng(seed)
    num_heads, chunks = int(rng.integers(1, 4)), int(rng.integers(2, 6))
    sizes = rng.integers(1, 12, (chunks, num_heads))
    budget = int(rng.integers(0, sizes.sum() + 1))
    score_of = {(h, i): rng.random() for h in range(num_heads)
                for i in range(sizes[:, h].sum())}

    def compress(held):
        lens = np.array([[len(ids) for ids in held]])
        scores = np.full((1, num_heads, max(lens.max(), 1)), np.inf)
        for h, ids in enumerate(held):
            scores[0, h, : len(ids)] = [score_of[h, i] for i in ids]
        plan = plan_variable(scores, lens, 1, max(0, int(lens.sum()) - budget))
        return [[i for k, i in enumerate(ids) if not plan.evicted[0, h, k]]
                for h, ids in enumerate(held)]

    held, seen = [[] for _ in range(num_heads)], np.zeros(num_heads, dtype=int)
    for chunk in sizes:
        for h, n in enumerate(chunk):
            held[h] += list(range(seen[h], seen[h] + n))
            seen[h] += n
        held = compress(held)
    one_shot = compress([list(range(n)) for n in seen])
    assert [sorted(ids) for ids in held] == [sorted(ids) for ids in one_shot]
    assert sum(map(len, held)) == min(budget, sizes.sum())
