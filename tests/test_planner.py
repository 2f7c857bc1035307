"""Eviction planning against a plain greedy reference: whole tail blocks per
head, KV-Compress's one ranking over every (layer, head) block, protected KVs
kept, budget respected; and the equal-count-per-head baseline."""

import numpy as np
import pytest

from vllm_kvcompress.compression import planner
from vllm_kvcompress.compression.planner import EvictionPlan


def as_numpy(plan: EvictionPlan) -> EvictionPlan:
    return EvictionPlan(plan.new_lens.numpy(), plan.evicted.numpy())


# The planner runs in torch (on the scores' device); these tests hand it
# numpy inputs and read its plans as numpy.
def plan_variable(*args, **kwargs):
    return as_numpy(planner.plan_variable(*args, **kwargs))


def plan_uniform(*args, **kwargs):
    return as_numpy(planner.plan_uniform(*args, **kwargs))


def evictable_mask(*args, **kwargs):
    return planner.evictable_mask(*args, **kwargs).numpy()


def hanging(length, bs):
    return 0 if length == 0 else (length % bs or bs)


def ranked_finite(scores_row, length):
    """Logical indices of the head's finite KVs, lowest score (then index) first."""
    finite = [i for i in range(length) if np.isfinite(scores_row[i])]
    return sorted(finite, key=lambda i: (scores_row[i], i))


def reference_variable(scores, lens, bs, max_evict):
    """Greedy: repeatedly free the globally cheapest next block of any head."""
    num_layers, num_heads, _ = scores.shape
    heads = [(l, h) for l in range(num_layers) for h in range(num_heads)]
    ranked = {lh: ranked_finite(scores[lh], int(lens[lh])) for lh in heads}
    freed = dict.fromkeys(heads, 0)
    total = 0
    while True:
        options = []
        for flat, lh in enumerate(heads):
            k = freed[lh] + 1
            need = (k - 1) * bs + hanging(int(lens[lh]), bs)
            if lens[lh] > 0 and need <= len(ranked[lh]):
                cost = hanging(int(lens[lh]), bs) if k == 1 else bs
                options.append((scores[lh][ranked[lh][need - 1]], flat, k, cost, lh))
        if not options:
            break
        _, _, _, cost, lh = min(options)
        if total + cost > max_evict:
            break
        freed[lh] += 1
        total += cost
    evicted = np.zeros(scores.shape, dtype=bool)
    for lh in heads:
        if freed[lh]:
            n = (freed[lh] - 1) * bs + hanging(int(lens[lh]), bs)
            evicted[lh][ranked[lh][:n]] = True
    return evicted


def random_case(rng):
    bs = int(rng.choice([2, 4, 8]))
    num_layers, num_heads = rng.integers(1, 4, size=2)
    width = int(rng.integers(1, 5 * bs))
    lens = rng.integers(0, width + 1, size=(num_layers, num_heads))
    lens.flat[rng.integers(lens.size)] = bs * rng.integers(0, width // bs + 1)
    if rng.random() < 0.5:  # small integers: many ties
        scores = rng.integers(0, 4, size=(num_layers, num_heads, width)).astype(float)
    else:
        scores = rng.random((num_layers, num_heads, width))
    scores[rng.random(scores.shape) < rng.choice([0.0, 0.1, 0.5])] = np.inf
    return scores, lens, bs


def check_block_shape(scores, lens, bs, plan):
    evicted_counts = plan.evicted.sum(-1)
    assert np.array_equal(plan.new_lens, lens - evicted_counts)
    assert plan.new_lens.dtype == np.int64
    assert not plan.evicted[np.arange(scores.shape[-1]) >= lens[..., None]].any()
    assert not plan.evicted[np.isinf(scores)].any()
    freed = -(-lens // bs) - -(-plan.new_lens // bs)
    for lh in np.ndindex(lens.shape):
        k = freed[lh]
        expected = 0 if k == 0 else (k - 1) * bs + hanging(int(lens[lh]), bs)
        assert evicted_counts[lh] == expected


@pytest.mark.parametrize("seed", range(300))
def test_variable_matches_greedy_reference(seed):
    rng = np.random.default_rng(seed)
    scores, lens, bs = random_case(rng)
    max_evict = int(rng.integers(0, lens.sum() + 2))
    plan = plan_variable(scores, lens, bs, max_evict)
    assert np.array_equal(plan.evicted, reference_variable(scores, lens, bs, max_evict))
    check_block_shape(scores, lens, bs, plan)
    assert plan.evicted.sum() <= max_evict


def test_variable_prefers_the_least_useful_head():
    """Head 1's KVs score lower, so it gives up both of its full blocks."""
    scores = np.array([[[5.0, 6, 7, 8], [1.0, 2, 3, 4]]])
    plan = plan_variable(scores, np.array([[4, 4]]), 2, max_evict=4)
    assert plan.new_lens.tolist() == [[4, 0]]


def test_variable_frees_a_partial_last_block_first():
    """Freeing the first block of a head costs only its hanging KVs."""
    scores = np.array([[[3.0, 1, 2, 9, 9]]])
    plan = plan_variable(scores, np.array([[5]]), 4, max_evict=3)
    assert plan.new_lens.tolist() == [[4]]
    assert plan.evicted[0, 0].tolist() == [False, True, False, False, False]


def test_variable_with_no_budget_or_nothing_evictable():
    scores = np.full((2, 3, 6), np.inf)
    lens = np.full((2, 3), 6)
    assert not plan_variable(scores, lens, 2, 100).evicted.any()
    assert not plan_variable(np.zeros_like(scores), lens, 2, 0).evicted.any()


@pytest.mark.parametrize("seed", range(100))
def test_uniform_keeps_the_same_count_per_head(seed):
    rng = np.random.default_rng(1000 + seed)
    scores, lens, bs = random_case(rng)
    keep = int(rng.integers(0, scores.shape[-1] + 1))
    plan = plan_uniform(scores, lens, bs, keep)
    check_block_shape(scores, lens, bs, plan)
    for lh in np.ndindex(lens.shape):
        ranked = ranked_finite(scores[lh], int(lens[lh]))
        n = int(plan.evicted[lh].sum())
        assert plan.evicted[lh][ranked[:n]].all()  # its n lowest
        assert plan.new_lens[lh] >= min(keep, lens[lh])
        # One more block would cut below ``keep`` or into protected KVs.
        more = n + (hanging(int(lens[lh]), bs) if n == 0 else bs)
        assert lens[lh] == 0 or more > lens[lh] - keep or more > len(ranked)


def test_evictable_mask_protects_window_sinks_and_unheld():
    positions = np.array([[[0, 1, 2, 3, 4, 5, 6, 7]]])
    mask = evictable_mask(positions, np.array([[7]]), seq_len=8,
                          protected_window=2, num_sinks=1)
    assert mask[0, 0].tolist() == [False, True, True, True, True, True, False, False]
    # Compaction reorders positions; the mask follows positions, not indices.
    shuffled = positions[..., ::-1].copy()
    mask = evictable_mask(shuffled, np.array([[8]]), 8, 2, 1)
    assert mask[0, 0].tolist() == [False, False, True, True, True, True, True, False]


def test_head_floor_keeps_each_heads_best_kvs():
    from vllm_kvcompress.compression.allocation import keep_best

    # Head 0's attention sits on one KV: without a floor the single ranking
    # strips the rest of it first.
    scores = np.array([[[9.0, 0.001, 0.002, 0.003, np.inf, np.inf],
                        [0.3, 0.2, 0.4, 0.1, 0.5, np.inf]]])
    lens = np.array([[6, 5]])
    plain = plan_variable(scores, lens, block_size=1, max_evict=5)
    assert plain.new_lens[0, 0] == 3  # only the sink KV and the protected pair
    floored = keep_best(scores, 2).numpy()
    assert np.isinf(floored[0, 0, :4]).tolist() == [True, False, False, True]
    assert np.isinf(floored[0, 1, [2, 4]]).all()  # head 1's two best
    plan = plan_variable(floored, lens, block_size=1, max_evict=5)
    assert plan.new_lens[0, 0] >= 4
