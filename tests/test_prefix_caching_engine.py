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


def test_compressed_requests_share_and_copy_before_compressing(tiny_llama, tmp_path):
    """An engine at rate 8 with prefix caching on and a small pool: later
    turns hit the cached prefix; a request compresses only after copying
    the cached blocks other requests share (the bytes of every cached
    head-block are checked unchanged after every step) and never caches
    compressed blocks; idle cached blocks are reclaimed for new work; the
    books, with shared ids, balance after every step."""
    spec = {"model": tiny_llama, "prompts": chat_prompts(tiny_llama), "max_tokens": 60,
            "waves": WAVES, "watch_cached": True,
            "engine": {**BASE, "kv_compress_rate": 8, "kv_compress_debug": True,
                       "num_gpu_blocks_override": 50, "max_model_len": 1200}}
    result = run_engine_job(spec, tmp_path, "pc-rate-8")
    hits = result["prefix_hits"]
    # The pool is tight: the system prompt is hit by wave 2; by wave 3 the
    # copies made for compressions have pushed the idle cache out.
    assert hits["0"] == 0 and all(hits[i] >= 576 for i in "123"), hits
    assert result["cached_blocks_watched"] > 0
    assert result["evicted"] > 0
    cached = [step["cached"] for step in result["trace"]]
    assert any(b < a for a, b in zip(cached, cached[1:])), "no cached block was reclaimed"
    assert all(len(out) == 60 for out in result["outputs"].values())
    assert result["final"]["held"] == 0


def test_with_room_every_turn_hits_the_earlier_turns(tiny_llama, tmp_path):
    """The same chats with a pool that holds them: every later request hits
    its whole cached history, compressed or not."""
    spec = {"model": tiny_llama, "prompts": chat_prompts(tiny_llama), "max_tokens": 24,
            "waves": WAVES,
            "engine": {**BASE, "kv_compress_rate": 8, "kv_compress_debug": True}}
    hits = run_engine_job(spec, tmp_path, "pc-roomy")["prefix_hits"]
    assert hits == {"0": 0, "1": 576, "2": 672, "3": 672, "4": 864, "5": 576}
