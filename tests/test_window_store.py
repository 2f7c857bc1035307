"""Observation windows keep, per request, exactly its last ``size`` queries.

Random steps (prefill chunks and decodes of varying requests, some not
wanted, requests finishing and new ones taking their slots, the store
growing) go through plan -> the backend's per-layer capture -> absorb, and
every window is checked against a plain list of each request's queries."""

import numpy as np
import pytest
import torch

from vllm_kvcompress.compression.window import WindowStore

LAYERS, HEADS, DIM, SIZE = 3, 2, 4, 5


def query_of(req: int, position: int, layer: int) -> torch.Tensor:
    """A query that names its request, position and layer."""
    return torch.full((HEADS, DIM), float(req * 10_000 + position * 10 + layer))


@pytest.mark.parametrize("seed", range(5))
def test_windows_hold_each_requests_last_queries(seed):
    rng = np.random.default_rng(seed)
    store = WindowStore(LAYERS, HEADS, DIM, SIZE, torch.float32)
    seen: dict[int, list[int]] = {}  # request -> positions of its wanted queries
    done: dict[int, int] = {}  # request -> tokens processed
    wanted_of: dict[int, bool] = {}
    next_req = 0
    for _ in range(60):
        while len(done) < 6:
            done[next_req], wanted_of[next_req], seen[next_req] = 0, rng.random() < 0.8, []
            next_req += 1
        running = [r for r in done if rng.random() < 0.8] or list(done)
        counts = np.array([int(rng.choice([1, 1, 1, 3, 7])) for _ in running])
        firsts = np.array([done[r] for r in running])
        capture = store.plan([str(r) for r in running], counts, firsts,
                             [wanted_of[r] for r in running])
        # The step's token-major queries, as the model would produce them.
        step = [(r, done[r] + i) for r, n in zip(running, counts) for i in range(n)]
        for layer in range(LAYERS):
            query = torch.stack([query_of(r, p, layer) for r, p in step])
            if capture is not None:
                capture.take(layer, query)
        if capture is not None:
            store.absorb(capture)
        else:
            assert not any(wanted_of[r] for r in running)
        for r, n in zip(running, counts):
            if wanted_of[r]:
                seen[r].extend(range(done[r], done[r] + n))
            done[r] += n
        for r in list(done):
            window = store.window(str(r))
            if not wanted_of[r] or not seen[r]:
                assert window is None
                continue
            kept = window.positions[window.positions >= 0].tolist()
            assert sorted(kept) == seen[r][-SIZE:]
            for slot, position in enumerate(window.positions.tolist()):
                if position >= 0:
                    for layer in range(LAYERS):
                        assert torch.equal(window.queries[layer, slot],
                                           query_of(r, position, layer))
        for r in [r for r in done if rng.random() < 0.15]:
            store.drop(str(r))
            del done[r], seen[r], wanted_of[r]
    assert store.queries.shape[0] >= 6  # grew past its first four slots


def test_absorb_without_plan_fails_loudly():
    store = WindowStore(LAYERS, HEADS, DIM, SIZE, torch.float32)
    capture = store.plan(["a"], np.array([2]), np.array([0]), [True])
    store.absorb(capture)
    with pytest.raises(RuntimeError, match="without a plan"):
        store.absorb(capture)
