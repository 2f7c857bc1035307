"""The head-block books balance through abort and preemption: every step is
checked in debug mode (and again by the job after each step), and when the
engine is idle every head-block is back in the pool."""

import pytest

from engine_helpers import mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

BASE = dict(dtype="float32", max_model_len=2048, enforce_eager=True,
            block_size=32, enable_prefix_caching=False, max_num_batched_tokens=512)
PLUGIN = {"kv_compress_rate": 1, "kv_compress_debug": True}


def test_abort_mid_generation_frees_every_head_block(tiny_llama, tmp_path):
    prompts = mixed_prompts(tiny_llama, [300, 900, 40, 600, 120, 1000], seed=1)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 48,
            "engine": {**BASE, **PLUGIN}, "abort_at_step": 6, "abort": [0, 1, 3]}
    result = run_engine_job(spec, tmp_path, "abort")
    # Aborted requests produced no finished output; the others completed.
    assert sorted(result["outputs"]) == ["2", "4", "5"]
    before, after = result["held_around_abort"]
    assert before > after > 0, "the abort returned no head-blocks"
    assert result["final"]["held"] == 0
    assert result["final"]["free"] == result["final"]["size"]
    assert result["final"]["tables"] == []


def test_preemption_frees_and_recomputes_like_stock(tiny_llama, tmp_path):
    # 40 token-blocks of 32 tokens cannot hold 6 requests of 250 + 150 tokens:
    # vLLM must preempt running requests while they decode.
    engine = {**BASE, "num_gpu_blocks_override": 40, "max_model_len": 1024}
    prompts = mixed_prompts(tiny_llama, [250] * 6, seed=2)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 150}
    stock = run_engine_job({**spec, "engine": engine}, tmp_path, "preempt-stock")
    plugin = run_engine_job({**spec, "engine": {**engine, **PLUGIN}}, tmp_path,
                            "preempt-plugin")
    assert stock["preemptions"] > 0
    # Same capacity at rate 1, so the same scheduling and the same tokens.
    assert plugin["preemptions"] == stock["preemptions"]
    assert plugin["outputs"] == stock["outputs"]
    # (token-blocks - vLLM's null block) x layers x KV heads
    assert plugin["final"]["size"] == 39 * 2 * 2
    assert max(s["held"] for s in plugin["trace"]) <= plugin["final"]["size"]
    assert plugin["final"]["held"] == 0 and plugin["final"]["tables"] == []
