"""Parameter grids for the kernel tests: every pair of values, or the full
product.

In Triton's interpreter each case costs about half a second, and the full
product of dtype x block size x GQA group x case kind adds no code path that
the pairs miss (each kernel branches on one parameter at a time). Every pair
of values still meets in some case, so a bug that needs two of them at once
is still caught. On a GPU, or with ``KVCOMPRESS_FULL_GRID=1``, the tests run
the full product.
"""

from __future__ import annotations

import itertools
import os

import torch

FULL_GRID = os.environ.get("KVCOMPRESS_FULL_GRID") == "1" or torch.cuda.is_available()


def grid(**axes: list) -> list[tuple]:
    """Cases for ``pytest.mark.parametrize(",".join(axes), grid(...))``."""
    if FULL_GRID:
        return list(itertools.product(*axes.values()))
    return pairwise(list(axes.values()))


def pairwise(levels: list[list]) -> list[tuple]:
    """A small set of rows in which every value of each axis meets every
    value of every other axis at least once (greedy: each row is the one of
    the full product that covers the most uncovered pairs; ties go to the
    first, so the set is the same on every run)."""
    if len(levels) < 2:
        return list(itertools.product(*levels))

    def pairs(row):
        return {(i, row[i], j, row[j])
                for i, j in itertools.combinations(range(len(row)), 2)}

    indices = list(itertools.product(*(range(len(values)) for values in levels)))
    uncovered = set().union(*(pairs(row) for row in indices))
    chosen = []
    while uncovered:
        best = max(indices, key=lambda row: len(pairs(row) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return [tuple(levels[axis][k] for axis, k in enumerate(row)) for row in chosen]
