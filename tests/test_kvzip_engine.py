"""KVzip in a real engine (vLLM's default compiled model): the scores the
reconstruction pass gives every KV equal a transformers reference computed
from the definition (eager attention, the same chunks), the pass writes
nothing a neighbour reads (rate-1 requests in the same steps answer as stock
vLLM does), the books balance after every step (debug mode), and its cost
is counted.

Run directly, this file is a job script: it wraps ``engine_job.run``,
records what the reconstruction pass returned, and scores the first
recorded context with transformers in the same process.
"""

import json
import sys
from pathlib import Path

import pytest
from engine_helpers import check_one_compressed_beside_stock, mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

CHUNK = 256
ENGINE = {"dtype": "float32", "max_model_len": 2048, "block_size": 32,
          "max_num_batched_tokens": 512, "enable_prefix_caching": False}
LENGTHS = [700, 400, 900]  # request 0 uses kvzip, the others keep everything


def reference_scores(model: str, context: list[int], prompt_ids) -> "torch.Tensor":
    """[L, H, N]: for each context KV, the largest attention probability any
    query of its group gives it while the model reads each reconstruction
    chunk right after the whole context (transformers, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_kvcompress.compression.reconstruction import reconstruction_chunks

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                              attn_implementation="eager")
    config = hf.config
    heads = config.num_key_value_heads
    n = len(context)
    best = torch.zeros(config.num_hidden_layers, heads, n)
    with torch.no_grad():
        for chunk in reconstruction_chunks(context, CHUNK, *prompt_ids):
            attentions = hf(torch.tensor([context + chunk]), output_attentions=True).attentions
            for layer, probs in enumerate(attentions):
                on_context = probs[0, :, n:, :n].reshape(heads, -1, n)
                best[layer] = torch.maximum(best[layer], on_context.amax(dim=1))
    return best


def record_scores(spec: dict) -> dict:
    """``engine_job.run``, then the first kvzip pass checked against
    ``reference_scores``."""
    from engine_job import run

    from vllm_kvcompress.worker.reconstruction import ReconstructionScorer

    passes, original = [], ReconstructionScorer.score

    def recording(self, req_id, context, table, slots):
        scores, fed = original(self, req_id, context, table, slots)
        passes.append((context.tolist(), scores.clone(), fed, self.prompt_ids()))
        return scores, fed

    ReconstructionScorer.score = recording
    result = run(spec)
    context, scores, fed, prompt_ids = passes[0]
    reference = reference_scores(spec["model"], context, prompt_ids)
    engine = scores[:, :, :len(context)]
    return {**result, "passes": len(passes), "fed": fed, "context": len(context),
            "later": [(len(p[0]), p[2]) for p in passes[1:]],
            "max_score_error": float((engine - reference).abs().max()),
            "reference_max": float(reference.max()),
            "padding_scores": float(scores[:, :, len(context):].abs().sum())}


def test_scores_match_the_definition_and_neighbours_match_stock(tiny_llama, tmp_path):
    prompts = mixed_prompts(tiny_llama, LENGTHS, seed=21)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 24}
    stock = run_engine_job({**spec, "engine": ENGINE}, tmp_path, "stock")
    extra = [{"kv_compress_rate": 4, "kv_compress_policy": "kvzip"}, None, None]
    plugin = run_engine_job(
        {**spec, "extra_args": extra,
         "engine": {**ENGINE, "kv_compress_rate": 1, "kv_compress_debug": True,
                    "kv_compress_kvzip_chunk": CHUNK, "kv_compress_interval": 10}},
        tmp_path, "kvzip", script=Path(__file__))
    assert plugin["compiled"]

    # The first pass ran after the 700-token prompt (chunks of 256: 3), and
    # its scores are the definition's, padding excluded.
    assert plugin["context"] == LENGTHS[0]
    assert plugin["reference_max"] > 0.1
    assert plugin["max_score_error"] < 1e-4, plugin["max_score_error"]
    assert plugin["padding_scores"] == 0
    assert LENGTHS[0] < plugin["fed"] <= LENGTHS[0] + 3 * 64
    # Every 10 decode steps another compression: its pass re-reads only the
    # tokens added since the last one (one chunk, with its instruction).
    later = plugin["later"]
    assert len(later) >= 1, later
    contexts = [plugin["context"]] + [n for n, _ in later]
    for (n, fed), before in zip(later, contexts):
        assert n - before < fed <= n - before + 64
    assert plugin["reconstruction_tokens"] == plugin["fed"] + sum(f for _, f in later)

    # It evicted what rate 4 asks, and wrote nothing the others read
    # (2 layers x 2 KV heads).
    check_one_compressed_beside_stock(plugin, stock, LENGTHS, rate=4, heads=4, max_tokens=24)
    # kvzip never reads the observation window, so no queries were kept.
    assert plugin["window_slots"] == 0


def test_a_context_near_the_last_position_is_still_scored(tiny_llama, tmp_path):
    """The tiny Llama has 4096 positions: after a 3600-token prompt a
    512-token chunk does not fit behind the context, so it is moved back
    (overlapping the context's end) instead of failing the step."""
    prompts = mixed_prompts(tiny_llama, [3600, 300], seed=5)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 4,
            "engine": {**ENGINE, "max_model_len": 4096, "enforce_eager": True,
                       "kv_compress_rate": 4, "kv_compress_policy": "kvzip",
                       "kv_compress_debug": True}}
    result = run_engine_job(spec, tmp_path, "near-the-end")
    assert result["finish_reasons"] == {"0": "length", "1": "length"}
    assert result["reconstruction_tokens"] > 3900
    assert result["evicted"] > 0
    assert result["final"]["held"] == 0


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(record_scores(job), f)
