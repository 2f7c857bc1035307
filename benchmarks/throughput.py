"""Output tokens/s of stock vLLM vs the plugin on the same workload, in one run.

Every engine runs in its own process (fresh, same settings), alternating
stock and plugin runs so machine noise hits both; the figure that counts is
the ratio of medians.

    python benchmarks/throughput.py [--prompts 16] [--input-len 1024]
        [--output-len 128] [--repeats 2] [--out docs/results/throughput-rate1.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINE = dict(dtype="float32", max_model_len=4096, enforce_eager=True,
              block_size=32, enable_prefix_caching=False)


def worker(spec_path: str, out_path: str) -> None:
    """One engine: generate the workload once, report timing."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_space_gib"]))
    import vllm_kvcompress  # noqa: F401
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"],
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    Path(out_path).write_text(json.dumps({"seconds": elapsed, "tokens": generated}))


def make_prompts(model: str, count: int, length: int) -> list[list[int]]:
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3][:5000]
    prompts = []
    for _ in range(count):
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(length)))["input_ids"]
        prompts.append(ids[:length])
    return prompts


def run_engine(spec: dict, tmp: Path, name: str) -> dict:
    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path),
                           str(out_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description="stock vLLM vs vllm_kvcompress")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-space-gib", type=int, default=1)
    parser.add_argument("--out", default="docs/results/throughput-rate1.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    from tqdm import tqdm

    from vllm_kvcompress.assets import smollm2_path

    model = smollm2_path()
    base = {"model": model, "output_len": args.output_len,
            "kv_space_gib": args.kv_space_gib,
            "prompts": make_prompts(model, args.prompts, args.input_len)}
    variants = {"stock": ENGINE, "kvcompress-rate1": {**ENGINE, "kv_compress_rate": 1}}
    runs = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(r, name) for r in range(args.repeats) for name in variants]
        for r, name in tqdm(plan, desc="engine runs", unit="run"):
            result = run_engine({**base, "engine": variants[name]}, Path(tmp),
                                f"{name}-{r}")
            runs[name].append(result["tokens"] / result["seconds"])
    medians = {name: statistics.median(v) for name, v in runs.items()}
    report = {
        "workload": {k: getattr(args, k) for k in
                     ("prompts", "input_len", "output_len", "repeats", "kv_space_gib")},
        "model": "SmolLM2-135M-Instruct (float32)",
        "output_tokens_per_s": runs,
        "median_tokens_per_s": medians,
        "ratio_plugin_over_stock": medians["kvcompress-rate1"] / medians["stock"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
