"""Eviction end to end in a real engine: memory held follows the rate, the
books balance with compression under abort and preemption, and per-request
settings win over the engine's."""

import math

import pytest

from engine_helpers import first_compressed, kept_after_prompt, mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

BS = 32
PROTECTED = 32  # the default protected window
ENGINE = dict(dtype="float32", max_model_len=4096, enforce_eager=True,
              block_size=BS, max_num_batched_tokens=512, kv_compress_debug=True)


RATES = [2, 8, 32]
OVERRIDE_LEN = 1000


@pytest.fixture(scope="module")
def per_request_rates(tiny_llama, tmp_path_factory):
    """One engine at rate 16: a 1500-token request at each of RATES (its
    own setting), each alone in its wave, then two 1000-token requests
    together, one at the engine's rate and one asking for rate 2."""
    prompts = [mixed_prompts(tiny_llama, [1500], seed=rate)[0] for rate in RATES]
    prompts += mixed_prompts(tiny_llama, [OVERRIDE_LEN, OVERRIDE_LEN], seed=5)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 3,
            "engine": {**ENGINE, "kv_compress_rate": 16},
            "extra_args": [{"kv_compress_rate": rate} for rate in RATES]
                          + [None, {"kv_compress_rate": 2}],
            "waves": [[0], [1], [2], [3, 4]]}
    return run_engine_job(spec, tmp_path_factory.mktemp("rates"), "rates")


@pytest.mark.parametrize("index, rate", list(enumerate(RATES)))
def test_held_memory_follows_the_rate(per_request_rates, index, rate):
    result, rid = per_request_rates, str(index)
    prompt_len, heads = 1500, 2 * 2  # tiny llama: 2 layers x 2 KV heads
    step = first_compressed(result["trace"], rid, prompt_len)
    info = step["requests"][rid]
    target = kept_after_prompt(prompt_len, heads, rate)
    # Whole blocks go, so a request keeps at most one block's worth more.
    assert target <= info["kvs"] < target + BS
    # Held head-blocks: ceil(kept / bs) per head, at most one partial each.
    assert math.ceil(info["kvs"] / BS) <= info["blocks"] <= info["kvs"] / BS + heads
    # vLLM's KV-usage metric reads the pool (the request is alone in it), so
    # it drops with it.
    assert list(step["requests"]) == [rid]
    size = result["final"]["size"]
    uncompressed_usage = heads * math.ceil(prompt_len / BS) / size
    assert step["usage"] == pytest.approx(info["blocks"] / size)
    assert step["usage"] < uncompressed_usage * (1 / rate + heads / (prompt_len / BS))
    assert result["final"]["held"] == 0


def test_heads_keep_different_amounts_under_kvcompress(smollm2, tmp_path):
    prompt = mixed_prompts(smollm2, [1200], seed=7)
    spec = {"model": smollm2, "prompts": prompt, "max_tokens": 2,
            "engine": {**ENGINE, "kv_compress_rate": 8, "kv_compress_policy": "kvcompress"}}
    result = run_engine_job(spec, tmp_path, "variable")
    step = first_compressed(result["trace"], "0", 1200)
    info = step["requests"]["0"]
    assert info["max_head"] - info["min_head"] >= 2 * BS  # not a uniform cut
    assert info["min_head"] >= PROTECTED


def test_books_balance_with_compression_abort_and_preemption(tiny_llama, tmp_path):
    # Compression lets more requests in than the 40-block pool holds
    # uncompressed; their decodes then outgrow it and vLLM must preempt.
    prompts = mixed_prompts(tiny_llama, [300] * 6, seed=4)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 250,
            "engine": {**ENGINE, "kv_compress_rate": 2, "kv_compress_interval": 32,
                       "num_gpu_blocks_override": 40, "max_model_len": 1100},
            "abort_at_step": 12, "abort": [1]}
    result = run_engine_job(spec, tmp_path, "books")
    assert result["evicted"] > 0
    assert result["preemptions"] > 0
    assert sorted(result["outputs"]) == ["0", "2", "3", "4", "5"]
    assert all(len(t) == 250 for t in result["outputs"].values())
    assert max(s["running"] for s in result["trace"]) > 40 * 32 // (300 + 250)
    assert result["final"]["held"] == 0 and result["final"]["tables"] == []


def test_requests_aborted_while_being_compressed_free_everything(tiny_llama, tmp_path):
    # Each of requests 1 and 3 is aborted in the step that compresses it
    # (after the worker compacted it, before the scheduler saw the reply).
    prompts = mixed_prompts(tiny_llama, [300, 500, 200, 700, 400], seed=8)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 64,
            "engine": {**ENGINE, "kv_compress_rate": 4, "kv_compress_interval": 8},
            "abort_during_compression": True, "abort": [1, 3]}
    result = run_engine_job(spec, tmp_path, "abort_compressing")
    assert sorted(result["aborted_in_compression"]) == ["1", "3"]
    assert sorted(result["outputs"]) == ["0", "2", "4"]
    assert all(len(t) == 64 for t in result["outputs"].values())
    assert result["evicted"] > 0
    assert result["final"]["held"] == 0 and result["final"]["tables"] == []
    assert result["stats_live_requests"] == 0  # the aborted ones not counted


def test_a_pool_running_dry_triggers_compression_before_preemption(tiny_llama, tmp_path):
    # No interval: after the prompts, only a pool running dry compresses.
    prompts = mixed_prompts(tiny_llama, [300] * 6, seed=6)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 250,
            "engine": {**ENGINE, "kv_compress_rate": 4, "num_gpu_blocks_override": 40,
                       "max_model_len": 1100}}
    result = run_engine_job(spec, tmp_path, "dry")
    assert result["low_memory_compressions"] > 0
    # Decode tokens were evicted too, beyond what the prompts alone allow.
    prompt_only = 6 * (4 * 300 - kept_after_prompt(300, 4, 4))
    assert result["evicted"] > prompt_only + 4 * BS
    assert all(len(t) == 250 for t in result["outputs"].values())
    assert result["final"]["held"] == 0


def test_request_settings_override_the_engine(per_request_rates):
    result, heads = per_request_rates, 4
    sixteen = first_compressed(result["trace"], "3", OVERRIDE_LEN)["requests"]["3"]
    two = first_compressed(result["trace"], "4", OVERRIDE_LEN)["requests"]["4"]
    engine_rate = kept_after_prompt(OVERRIDE_LEN, heads, 16)
    assert engine_rate <= sixteen["kvs"] < engine_rate + BS
    asked = kept_after_prompt(OVERRIDE_LEN, heads, 2)
    assert asked <= two["kvs"] < asked + BS
