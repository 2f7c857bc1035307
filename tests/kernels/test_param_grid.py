"""The pairwise grid really covers every pair, and is much smaller than the
product it replaces."""

import itertools

from param_grid import pairwise


def test_every_pair_of_values_meets_in_some_row():
    levels = [["decode", "prefill"], [16, 32], [1, 3, 4, 8], ["fp32", "fp16", "bf16"]]
    rows = pairwise(levels)
    for (i, a), (j, b) in itertools.combinations(enumerate(levels), 2):
        for x, y in itertools.product(a, b):
            assert any(row[i] == x and row[j] == y for row in rows), (x, y)
    assert len(rows) <= 14 < len(list(itertools.product(*levels)))
    assert rows == pairwise(levels)  # the same cases on every run


def test_one_axis_is_all_its_values():
    assert pairwise([[1, 2, 3]]) == [(1,), (2,), (3,)]
