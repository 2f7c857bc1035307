"""Cascading compression between prompt chunks (--kv-compress-cascade) on the
tiny GQA Llama: a prompt four times larger than the whole KV pool is served
(stock vLLM refuses to start), a request never holds more than its budget
plus one chunk, and the kept amount matches one-shot compression."""

import math

import pytest

from engine_helpers import (
    engine_job_error,
    first_compressed,
    kept_after_prompt,
    mixed_prompts,
    run_engine_job,
)

pytestmark = pytest.mark.engine

BS = 32
HEADS = 2 * 2  # tiny Llama: 2 layers x 2 KV heads
CHUNK = 256
RATE = 8
POOL_TOKENS = 1024  # 32 usable token blocks (vLLM keeps one aside)
LONG = 4000
ENGINE = dict(dtype="float32", max_model_len=4096, enforce_eager=True, block_size=BS,
              max_num_batched_tokens=CHUNK, num_gpu_blocks_override=POOL_TOKENS // BS + 1)
PLUGIN = dict(kv_compress_rate=RATE, kv_compress_debug=True)


def budget(num_tokens: int) -> int:
    """KVs the rate keeps over all heads (the protected 32 newest whole)."""
    return kept_after_prompt(num_tokens, HEADS, RATE)


def test_without_cascading_a_max_model_len_beyond_the_pool_is_refused(tiny_llama, tmp_path):
    for name, engine in (("stock", ENGINE), ("plugin", {**ENGINE, **PLUGIN})):
        spec = {"model": tiny_llama, "prompts": [[1] * 10], "max_tokens": 1,
                "engine": engine}
        error = engine_job_error(spec, tmp_path, name)
        assert "max seq len (4096)" in error, error


@pytest.fixture(scope="module")
def cascaded(tiny_llama, tmp_path_factory):
    prompts = mixed_prompts(tiny_llama, [LONG, 700], seed=21)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 48,
            "engine": {**ENGINE, **PLUGIN, "kv_compress_cascade": True}}
    return run_engine_job(spec, tmp_path_factory.mktemp("cascade"), "cascade")


def test_a_prompt_four_times_the_pool_is_served(cascaded):
    assert sorted(cascaded["outputs"]) == ["0", "1"]
    assert all(len(t) == 48 for t in cascaded["outputs"].values())
    assert cascaded["finish_reasons"] == {"0": "length", "1": "length"}
    assert cascaded["final"]["held"] == 0 and cascaded["final"]["tables"] == []
    assert cascaded["final"]["size"] == POOL_TOKENS // BS * HEADS


def test_while_the_prompt_is_read_it_holds_its_budget_plus_one_chunk(cascaded):
    reading = [s["requests"]["0"] for s in cascaded["trace"]
               if "0" in s["requests"] and s["requests"]["0"]["computed"] < LONG]
    assert len(reading) >= LONG // CHUNK - 1
    # Compressed between chunks: fewer KVs than tokens read, long before the end.
    assert any(r["kvs"] < r["computed"] * HEADS for r in reading
               if r["computed"] <= LONG // 2)
    # At its peak (scheduled, not yet compressed): the final budget plus one
    # chunk, and at most one partly filled block per head.
    bound = math.ceil((budget(LONG) + CHUNK * HEADS) / BS) + HEADS
    assert cascaded["peak_blocks"]["0"] <= bound
    assert bound < LONG // BS * HEADS / 3  # far below the uncompressed prompt


def test_the_kept_amount_matches_one_shot_compression(cascaded, tiny_llama, tmp_path):
    """Same final budget as compressing the whole prompt at once (which needs
    a pool that holds it); only the block rounding differs."""
    prompts = mixed_prompts(tiny_llama, [LONG, 700], seed=21)
    one_shot_engine = {**ENGINE, **PLUGIN, "num_gpu_blocks_override": 300}
    one_shot = run_engine_job({"model": tiny_llama, "prompts": prompts, "max_tokens": 48,
                               "engine": one_shot_engine}, tmp_path, "one_shot")

    for result in (cascaded, one_shot):
        kept = first_compressed(result["trace"], "0", LONG)["requests"]["0"]["kvs"]
        assert budget(LONG) <= kept < budget(LONG) + HEADS * BS


def test_a_request_asking_for_less_compression_than_fits_is_refused(tiny_llama, tmp_path):
    """With cascading the pool may be smaller than a prompt; a request whose
    own settings would need the whole prompt at once can never run. It ends
    with an error at once, and the others are served."""
    prompts = mixed_prompts(tiny_llama, [LONG, LONG, 300], seed=22)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 16,
            "extra_args": [None, {"kv_compress_rate": 1}, None],
            "engine": {**ENGINE, **PLUGIN, "kv_compress_cascade": True}}
    result = run_engine_job(spec, tmp_path, "refused")
    assert result["finish_reasons"] == {"0": "length", "1": "error", "2": "length"}
    assert result["outputs"]["1"] == []
    assert result["final"]["held"] == 0


def test_a_preempted_request_rereads_within_the_cascading_bound(tiny_llama, tmp_path):
    """A preempted request re-reads its prompt and its output so far; while
    it does, cascading holds it to its budget on that whole text plus one
    chunk, the bound admission assumed."""
    prompts = mixed_prompts(tiny_llama, [600] * 4, seed=23)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 250,
            "engine": {**ENGINE, **PLUGIN, "kv_compress_cascade": True,
                       "kv_compress_rate": 1.25,
                       "num_gpu_blocks_override": 41, "max_model_len": 1100}}
    result = run_engine_job(spec, tmp_path, "cascade-preempt")
    assert result["preemptions"] > 0
    assert all(len(t) == 250 for t in result["outputs"].values())
    longest = 600 + 250
    kept = kept_after_prompt(longest, HEADS, 1.25)
    bound = math.ceil((kept + CHUNK * HEADS) / BS) + HEADS
    assert max(result["peak_blocks"].values()) <= bound
    assert result["final"]["held"] == 0 and result["final"]["tables"] == []


def test_cascading_still_refuses_a_budget_beyond_the_pool(tiny_llama, tmp_path):
    """Cascading bounds a request by its budget plus one chunk; when even
    that exceeds the pool, start-up stops and says which knobs to turn."""
    spec = {"model": tiny_llama, "prompts": [[1] * 10], "max_tokens": 1,
            "engine": {**ENGINE, "kv_compress_rate": 1.5, "kv_compress_cascade": True}}
    error = engine_job_error(spec, tmp_path, "beyond")
    assert "--kv-compress-cascade: a request of --max-model-len 4096" in error, error
    assert "(VLLM_CPU_KVCACHE_SPACE)" in error
