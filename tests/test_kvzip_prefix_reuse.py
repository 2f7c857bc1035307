"""kvzip with prefix caching, in a real engine: a request's pass stores its
scores with the prefix-cached blocks it copied, and a later request that
hits those blocks starts from them and re-reads only what follows its
cached prefix; no other policy starts from those scores.

Run directly, this file is a job script: it wraps ``engine_job.run`` and
records, per request, the context each pass saw, where it started reading
and the tokens it fed.
"""

import json
import sys
from pathlib import Path

import pytest
from engine_helpers import mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

CHUNK = 256
ENGINE = dict(dtype="float32", max_model_len=2048, block_size=32, enable_prefix_caching=True,
              max_num_batched_tokens=512, kv_compress_rate=4, kv_compress_debug=True,
              kv_compress_kvzip_chunk=CHUNK)


def chats(model: str) -> list[list[int]]:
    """A first chat, another with the same 600-token system prompt, and
    the first chat's next turn (its prompt, an answer, a new question)."""
    system, u1, u2, answer, u3 = mixed_prompts(model, [600, 100, 80, 50, 120], seed=8)
    return [system + u1, system + u2, system + u1 + answer + u3]


def record_passes(spec: dict) -> dict:
    """``engine_job.run``, with every kvzip pass recorded."""
    from engine_job import run

    from vllm_kvcompress.worker.reconstruction import ReconstructionScorer

    passes, original = [], ReconstructionScorer.score

    def recording(self, req_id, context, table, slots):
        start = self.reread.get(req_id, 0)
        scores, fed = original(self, req_id, context, table, slots)
        passes.append({"request": req_id.rsplit("-", 1)[0], "context": len(context),
                       "start": start, "fed": fed})
        return scores, fed

    ReconstructionScorer.score = recording
    return {**run(spec), "passes": passes}


def test_later_requests_reread_only_past_their_cached_prefix(tiny_llama, tmp_path):
    prompts = chats(tiny_llama)
    spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 8,
            "waves": [[0], [1], [2]], "watch_cached": True,
            "engine": {**ENGINE, "kv_compress_policy": "kvzip"}}
    result = run_engine_job(spec, tmp_path, "kvzip-reuse", script=Path(__file__))
    hits = result["prefix_hits"]
    assert hits == {"0": 0, "1": 576, "2": 672}, hits
    first = {}
    for record in result["passes"]:
        first.setdefault(record["request"], record)
    # The first chat is read whole; the others start at their cached prefix
    # (whole blocks the first chat's pass scored) and feed only the rest,
    # with one instruction per chunk.
    assert first["0"]["start"] == 0 and first["0"]["fed"] > len(prompts[0])
    for rid in ("1", "2"):
        rest = first[rid]["context"] - hits[rid]
        assert first[rid]["start"] == hits[rid], first[rid]
        assert rest < first[rid]["fed"] <= rest + 64, first[rid]
    assert result["reconstruction_tokens"] == sum(r["fed"] for r in result["passes"])
    assert result["cached_blocks_watched"] > 0  # and their K/V never changed
    assert all(len(out) == 8 for out in result["outputs"].values())
    assert result["final"]["held"] == 0


def test_other_policies_never_start_from_cached_kvzip_scores(tiny_llama, tmp_path):
    """A kvcompress request that copies blocks a kvzip request scored
    evicts exactly as when the blocks were cached by an uncompressed one."""
    prompts = chats(tiny_llama)[:2]
    window_policy = {"kv_compress_policy": "kvcompress"}
    runs = {}
    for first in ("kvzip", "uncompressed"):
        extra = {"kvzip": {"kv_compress_policy": "kvzip"},
                 "uncompressed": {"kv_compress_rate": 1}}[first]
        spec = {"model": tiny_llama, "prompts": prompts, "max_tokens": 24,
                "waves": [[0], [1]], "extra_args": [extra, window_policy],
                "kept_positions": True, "engine": ENGINE}
        runs[first] = run_engine_job(spec, tmp_path, f"after-{first}")
        assert runs[first]["prefix_hits"]["1"] == 576
    kept = {first: [step["requests"]["1"]["kept"] for step in run["trace"]
                    if "1" in step["requests"]]
            for first, run in runs.items()}
    assert kept["kvzip"] and kept["kvzip"] == kept["uncompressed"]
    assert runs["kvzip"]["outputs"]["1"] == runs["uncompressed"]["outputs"]["1"]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(record_passes(job), f)
