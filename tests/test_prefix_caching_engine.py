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


def test_abort_and_preemption_of_sharing_requests_leak_nothing(tiny_llama, tmp_path):
    """Requests that share cached blocks are preempted (the pool is tight)
    and two are aborted mid-generation; the books, holder counts and
    reserved copies balance after every step, cached bytes never change,
    and at idle every head-block is free or idle in the cache."""
    prompts = chat_prompts(tiny_llama)
    spec = {"model": tiny_llama, "prompts": prompts + prompts[:2], "max_tokens": 400,
            "watch_cached": True, "abort_at_step": 20, "abort": [1, 6],
            "extra_args": [{"kv_compress_rate": 1}] * 6 + [None] * 2,
            "engine": {**BASE, "kv_compress_rate": 8, "kv_compress_debug": True,
                       "num_gpu_blocks_override": 70, "max_model_len": 1500}}
    result = run_engine_job(spec, tmp_path, "pc-pressure")
    assert result["preemptions"] > 0
    assert sum(result["prefix_hits"].values()) > 0
    before, after = result["held_around_abort"]
    assert before > after
    assert sorted(result["outputs"]) == ["0", "2", "3", "4", "5", "7"]
    assert result["final"]["held"] == 0 and result["final"]["tables"] == []


def test_served_prefix_cache_metrics(tiny_llama, tmp_path):
    """``vllm serve --kv-compress-rate 8`` with vLLM's default prefix
    caching: the second request with the same long prefix is a hit on
    vLLM's own ``vllm:prefix_cache_*`` counters, and the cached head-blocks
    show on ``vllm:kv_compress_head_blocks_cached``."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from server_util import metric, vllm_server, wait_idle

    system = AutoTokenizer.from_pretrained(tiny_llama).decode(
        mixed_prompts(tiny_llama, [700], seed=9)[0])
    args = ["--kv-compress-rate", "8", "--kv-compress-debug", "--max-model-len", "2048",
            "--enforce-eager", "--block-size", "32"]
    with vllm_server(tiny_llama, args, tmp_path / "server.log") as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        for question in (" First question?", " Second question?"):
            client.completions.create(model=tiny_llama, prompt=system + question,
                                      max_tokens=8, temperature=0)
        assert wait_idle(base) == 0
        assert metric(base, "vllm:prefix_cache_hits_total") >= 640
        assert metric(base, "vllm:prefix_cache_queries_total") >= 1400
        assert metric(base, "vllm:kv_compress_head_blocks_cached") > 0
