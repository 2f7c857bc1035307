"""Prefix caching through the engine: requests sent in waves share a
system prompt and grow like chats (each turn repeats the last one), so
later waves hit blocks that finished requests left cached."""

import pytest

from engine_helpers import mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

BASE = dict(dtype="float32", max_model_len=2048, enforce_eager=True, block_size=32,
            enable_prefix_caching=True, max_num_batched_tokens=512)
WAVES = [[0, 1], [2, 3], [4, 5]]


def chat_prompts(model: str) -> list[list[int]]:
    system, u1, u2, u3, answer = mixed_prompts(model, [600, 100, 80, 120, 50], seed=8)
    turn_1 = [system + u1, system + u2]
    turn_2 = [turn_1[0] + answer + u3, turn_1[1] + answer + u1]
    return turn_1 + turn_2 + [turn_2[0] + answer + u2, system + u3]


def test_rate_1_hits_and_answers_as_stock(tiny_llama, tmp_path):
    spec = {"model": tiny_llama, "prompts": chat_prompts(tiny_llama), "max_tokens": 24,
            "waves": WAVES}
    stock = run_engine_job({**spec, "engine": BASE}, tmp_path, "pc-stock")
    plugin = run_engine_job(
        {**spec, "engine": {**BASE, "kv_compress_rate": 1, "kv_compress_debug": True}},
        tmp_path, "pc-plugin")
    assert plugin["outputs"] == stock["outputs"]
    assert plugin["prefix_hits"] == stock["prefix_hits"]
    assert sum(stock["prefix_hits"].values()) > 5 * 512  # the system prompt, and more
    assert plugin["final"]["held"] == 0


def test_compressed_requests_do_not_share_and_the_cache_gives_way(tiny_llama, tmp_path):
    """On an engine at rate 8, requests sent at rate 1 share and the others
    (compressed) neither hit nor add cached blocks. The pool is small, so
    idle cached blocks are reclaimed for new work; the books (checked every
    step) balance with shared ids."""
    rate_1 = {"kv_compress_rate": 1}
    spec = {"model": tiny_llama, "prompts": chat_prompts(tiny_llama), "max_tokens": 60,
            "waves": WAVES, "extra_args": [rate_1, None] * 3,
            "engine": {**BASE, "kv_compress_rate": 8, "kv_compress_debug": True,
                       "num_gpu_blocks_override": 40, "max_model_len": 1200}}
    result = run_engine_job(spec, tmp_path, "pc-mixed")
    hits = result["prefix_hits"]
    assert hits["2"] > 0 and hits["4"] > 0  # rate 1, after a rate-1 turn
    assert hits["1"] == hits["3"] == hits["5"] == 0  # compressed requests
    assert result["evicted"] > 0
    cached = [step["cached"] for step in result["trace"]]
    assert any(b < a for a, b in zip(cached, cached[1:])), "no cached block was reclaimed"
    assert all(len(out) == 60 for out in result["outputs"].values())
    assert result["final"]["held"] == 0
