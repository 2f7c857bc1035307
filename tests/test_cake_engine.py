"""CAKE, PyramidKV and Ada-KV's equal layer split in a real engine: every
compression keeps each layer within a block per head of its budget, requests
complete with the books balanced (debug mode), and a request can switch to
cake through extra_args.

The engine job's trace has no per-layer lengths, so this file doubles as a
job script: run directly, it wraps ``engine_job.run`` and records, for each
per-layer plan, the compressor's inputs (hence the budgets) and what each
layer kept.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import first_compressed, kept_after_prompt, mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

BS = 32
ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
          "block_size": BS, "max_num_batched_tokens": 512, "kv_compress_debug": True,
          "kv_compress_rate": 4, "kv_compress_interval": 16}


def record_plans(spec: dict) -> dict:
    """``engine_job.run`` with every per-layer plan recorded."""
    from engine_job import run

    from vllm_kvcompress.compression import allocation
    from vllm_kvcompress.compression.layer_budgets import allocate

    plans, original = [], allocation.plan_by_layer

    def recording(scores, lens, evictable, target, weights, block_size, variable):
        plan = original(scores, lens, evictable, target, weights, block_size, variable)
        held = lens.sum(1)
        protected = held - evictable.sum((1, 2))
        plans.append({
            "variable": variable, "target": target, "heads": lens.shape[1],
            "equal_weights": bool(np.all(np.asarray(weights) == 1)),
            "held": held.tolist(), "protected": protected.tolist(),
            "budgets": allocate(weights, target, protected, held).tolist(),
            "kept": plan.new_lens.sum(1).tolist(),
        })
        return plan

    allocation.plan_by_layer = recording
    return {**run(spec), "plans": plans}


@pytest.mark.parametrize("policy", ["pyramidkv", "cake", "adakv"])
def test_layers_follow_their_budgets(tiny_llama, tmp_path, policy):
    # Request 0 runs the engine's policy, request 1 switches to cake.
    prompts = mixed_prompts(tiny_llama, [1100, 900], seed=11)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 40,
            "engine": {**ENGINE, "kv_compress_policy": policy},
            "extra_args": [None, {"kv_compress_policy": "cake",
                                  "kv_compress_cake_gamma": 50}]}
    result = run_engine_job(spec, tmp_path, policy, script=Path(__file__))
    assert sorted(result["outputs"]) == ["0", "1"]
    assert all(len(t) == 40 for t in result["outputs"].values())
    assert result["evicted"] > 0
    assert result["final"]["held"] == 0 and result["final"]["tables"] == []

    for rid, length in (("0", 1100), ("1", 900)):
        kvs = first_compressed(result["trace"], rid, length)["requests"][rid]["kvs"]
        target = kept_after_prompt(length, 4, 4)  # 2 layers x 2 KV heads
        assert target <= kvs < target + 4 * BS

    plans = result["plans"]
    # After each prompt, at least; cake plans split heads by ranking.
    assert len(plans) >= 2
    assert any(p["variable"] for p in plans)
    assert any(not p["variable"] for p in plans) == (policy == "pyramidkv")
    for p in plans:
        budgets, kept, held = (np.array(p[k]) for k in ("budgets", "kept", "held"))
        assert budgets.sum() == min(p["target"], held.sum())
        assert (budgets <= kept).all() and (kept < budgets + p["heads"] * BS).all()
        if not p["variable"] and (budgets < held).all():
            assert budgets[0] > budgets[-1]  # the pyramid
    if policy == "adakv":  # its plans (not cake's): equal layer budgets
        equal = [p for p in plans if p["equal_weights"] and len(set(p["protected"])) == 1
                 and (np.array(p["budgets"]) < np.array(p["held"])).all()]
        assert equal
        assert all(max(p["budgets"]) - min(p["budgets"]) <= 1 for p in equal)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = record_plans(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
