"""Helpers for engine tests: run an engine job, make prompts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_engine_job(spec: dict, tmp_path: Path, name: str,
                   script: Path = HERE / "engine_job.py") -> dict:
    """Run ``engine_job.py`` (or a script wrapping it) in a fresh process; its
    result, or a failure showing the end of the engine's log."""
    proc, out_file = _engine_process(spec, tmp_path, name, script)
    if proc.returncode != 0:
        pytest.fail(f"engine job {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def engine_job_error(spec: dict, tmp_path: Path, name: str) -> str:
    """The end of the log of an engine job that must fail to start."""
    proc, _ = _engine_process(spec, tmp_path, name, HERE / "engine_job.py")
    assert proc.returncode != 0, f"engine job {name} did not fail"
    return proc.stderr[-6000:]


def _engine_process(spec: dict, tmp_path: Path, name: str, script: Path):
    spec_file, out_file = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(script), str(spec_file), str(out_file)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    return proc, out_file


def kept_after_prompt(prompt_len: int, heads: int, rate: float, protected: int = 32) -> int:
    """What the rate asks to keep: 1/rate of the compressible KVs plus the
    protected window, over all heads."""
    compressible = (prompt_len - protected) * heads
    return math.ceil(compressible / rate) + protected * heads


def first_compressed(trace, rid, prompt_len):
    """The first step after the request's prompt was read (and compressed)."""
    for step in trace:
        info = step["requests"].get(rid)
        if info and info["computed"] >= prompt_len:
            return step
    raise AssertionError(f"request {rid} never finished its prompt")


def check_one_compressed_beside_stock(plugin: dict, stock: dict, lengths: list[int],
                                      rate: float, heads: int, max_tokens: int) -> None:
    """Request "0" kept what ``rate`` asks after its prompt (whole blocks:
    less than one more block per head), every other request answered as
    stock vLLM did, and every head-block was freed at the end."""
    kvs = first_compressed(plugin["trace"], "0", lengths[0])["requests"]["0"]["kvs"]
    target = kept_after_prompt(lengths[0], heads, rate)
    assert target <= kvs < target + heads * 32
    for rid in map(str, range(1, len(lengths))):
        assert plugin["outputs"][rid] == stock["outputs"][rid], f"request {rid} diverged"
    assert len(plugin["outputs"]["0"]) == max_tokens
    assert plugin["final"]["held"] == 0 and plugin["final"]["tables"] == []


def mixed_prompts(model_path: str, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, cut from varied text."""
    return _mixed(model_path, lengths, seed)[0]


def mixed_texts(model_path: str, lengths: list[int], seed: int = 0) -> list[str]:
    """Texts of about the given token lengths (for chat messages)."""
    return _mixed(model_path, lengths, seed)[1]


def _mixed(model_path: str, lengths: list[int], seed: int):
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rng = random.Random(seed)
    subjects = ["The river", "A small robot", "My neighbour", "The old library",
                "Every engineer", "The committee", "A red fox", "The spacecraft"]
    verbs = ["remembered", "carried", "described", "measured", "forgot",
             "painted", "counted", "questioned"]
    objects = ["the long winter", "seven silver keys", "a map of the coast",
               "the price of bread", "an unfinished song", "the quiet harbour",
               "forty-two letters", "the last train home"]
    def sentence() -> str:
        return (f"{rng.choice(subjects)} {rng.choice(verbs)} "
                f"{rng.choice(objects)} in {rng.randint(1900, 2030)}.")

    prompts, texts = [], []
    for length in lengths:
        text = " ".join(sentence() for _ in range(length // 6 + 8))
        ids = tokenizer(text)["input_ids"]
        assert len(ids) >= length, "text generator too short for the prompt"
        prompts.append(ids[:length])
        texts.append(tokenizer.decode(ids[:length]))
    return prompts, texts
