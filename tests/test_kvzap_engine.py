"""kvzap end to end on the tiny Llama: the training command writes a scorer
from the engine's own kvzip pass, and an engine serving with it evicts what
the rate asks with the books balanced after every step (debug mode), reads
no observation window, runs no reconstruction pass, and leaves rate-1
requests (kvzap is the engine's policy) token-for-token as stock vLLM."""

import subprocess
import sys

import pytest
from engine_helpers import check_one_compressed_beside_stock, mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

ENGINE = {"dtype": "float32", "max_model_len": 2048, "block_size": 32,
          "max_num_batched_tokens": 512, "enable_prefix_caching": False}
LENGTHS = [700, 400, 900]  # request 0 at rate 4, the others at the engine's rate 1


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """The training command on the default corpus, a few short windows."""
    out = tmp_path_factory.mktemp("scorer") / "tiny.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "vllm_kvcompress.train_scorer", tiny_llama, "--out", str(out),
         "--lengths", "256", "--max-windows", "6"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout + run.stderr


def test_training_writes_a_scorer_with_its_validation(trained, tiny_llama):
    from transformers import AutoConfig

    from vllm_kvcompress.kvzap.features import FEATURE_SETS
    from vllm_kvcompress.kvzap.scorer_file import load_scorer, mismatches

    path, log = trained
    scorer = load_scorer(str(path))
    meta = scorer.metadata
    assert mismatches(meta, AutoConfig.from_pretrained(tiny_llama)) == []
    assert tuple(scorer.weights.shape) == (2, 2 * (32 - 16 + 32), 2)  # L, F, H
    assert meta["features"] == "all" and len(meta["validation_r2"]) == 2
    assert set(meta["feature_sets_r2"]) == set(FEATURE_SETS)
    assert meta["training"]["requests"]["train"] == 5
    assert meta["training"]["requests"]["validation"] == 1
    assert meta["training"]["tokens"]["train"] > 5 * 256
    assert "held-out R^2 per layer" in log and "kvzip teacher" in log


def test_kvzap_evicts_with_balanced_books_and_rate_one_is_stock(trained, tiny_llama, tmp_path):
    prompts = mixed_prompts(tiny_llama, LENGTHS, seed=21)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 24}
    stock = run_engine_job({**spec, "engine": ENGINE}, tmp_path, "stock")
    plugin = run_engine_job(
        {**spec, "extra_args": [{"kv_compress_rate": 4}, None, None],
         "engine": {**ENGINE, "kv_compress_rate": 1, "kv_compress_policy": "kvzap",
                    "kv_compress_scorer": str(trained[0]), "kv_compress_debug": True,
                    "kv_compress_interval": 10}},
        tmp_path, "kvzap")
    assert plugin["compiled"]
    # 2 layers x 2 KV heads; requests 1 and 2 are kvzap at rate 1.
    check_one_compressed_beside_stock(plugin, stock, LENGTHS, rate=4, heads=4, max_tokens=24)
    assert plugin["window_slots"] == 0  # no observation window kept
    assert plugin["reconstruction_tokens"] == 0  # and no pass over the context
