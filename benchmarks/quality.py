"""Quality suite: every policy at equal memory (the same rate) on four tasks
(see quality_tasks.py), SmolLM2-135M, greedy answers, through the engine.

One engine per task and length; each request carries its rate and policy in
SamplingParams.extra_args (rate 1 = full cache). The "after" task runs on an
engine that compresses between prompt chunks (--kv-compress-cascade) with a
chunk exactly as long as the haystack and no prefix caching, so every policy
evicts before the question is read. The others share prompts across
configurations through vLLM's prefix cache (on by default): every
configuration runs on a group of cases that the cache holds before the
next group starts.

Also recorded per configuration: compression seconds, and for kvzip the
reconstruction pass's seconds and extra tokens per prompt token, next to
the full cache's time per request (mostly prefill).

    python benchmarks/quality.py --task needle [--lengths 2048] [--cases 10]
        [--rates 2 4 8 16] [--policies kvzip kvcompress ...] [--out DIR]
        [--name NAME]  (results file NAME-LENGTH.json; default: the task)
    python benchmarks/quality.py --report [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

POLICIES = ["kvzip", "kvzap", "kvcompress", "adakv", "cake", "snapkv", "streamingllm"]
# Variants that exist only in this benchmark, to measure a design choice:
# kvzip's and kvzap's scores with Ada-KV's split (equal layer quotas, the
# heads of a layer ranked against each other) against their one ranking
# over all layers and heads.
VARIANTS = {"kvzip-within-layers": "kvzip", "kvzap-within-layers": "kvzap"}


def register_variants(names: list[str]) -> None:
    """Add the named benchmark-only policies to this process's engine (the
    engine runs in-process here)."""
    from dataclasses import replace

    from vllm_kvcompress import config
    from vllm_kvcompress.compression import policies
    from vllm_kvcompress.compression.allocation import PerLayer

    for name in names:
        policies.POLICIES[name] = replace(policies.POLICIES[VARIANTS[name]], name=name,
                                          allocation=PerLayer("equal", variable=True))
        config.POLICIES = (*config.POLICIES, name)


def run_task(task: str, length: int, cases_n: int, rates: list[float],
             policies: list[str], out_dir: Path, name: str | None = None,
             scorer: str | None = None) -> Path:
    # About 90,000 tokens of SmolLM2 in float32; a run whose prompts do not
    # fit the prefix cache splits its cases (``case_groups``). vLLM's CPU
    # worker refuses more than its NUMA node has free (7 GiB nodes seen).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read the scheduler's stats
    import vllm_kvcompress  # noqa: F401
    from tqdm import tqdm

    register_variants([p for p in policies if p in VARIANTS])
    from transformers import AutoTokenizer
    from vllm import LLM

    from quality_tasks import QUESTION_ROOM, TASKS
    from vllm_kvcompress.assets import smollm2_path

    model = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    cases = TASKS[task](tokenizer, length, cases_n, seed=length)
    engine = dict(model=model, dtype="float32", max_model_len=length + 64,
                  kv_compress_rate=2, max_num_seqs=8)
    if scorer is not None:  # kvzap's scorer, else the bundled one
        engine["kv_compress_scorer"] = scorer
    if task == "after":  # the haystack is one chunk, compressed before the question
        engine.update(kv_compress_cascade=True, max_num_seqs=1,
                      max_num_batched_tokens=length - QUESTION_ROOM,
                      enable_prefix_caching=False)
    llm = LLM(**engine)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    stats = scheduler.stats
    max_tokens = 40 if task == "vartrack" else 12
    configs = [("full", 1.0)] + [(p, r) for r in rates for p in policies]
    groups = (case_groups(scheduler.head_pool, cases, engine["max_num_seqs"],
                          engine["max_model_len"])
              if engine.get("enable_prefix_caching", True) else [cases])
    out = out_dir / f"{name or task}-{length}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"policy": policy, "rate": rate, "scores": [], "answers": [],
             "seconds_per_request": 0.0, "compress_seconds_per_request": 0.0,
             "reconstruction_seconds_per_request": 0.0,
             "reconstruction_tokens_per_prompt_token": 0.0} for policy, rate in configs]
    prompt_tokens = sum(map(prompt_length, cases))
    progress = tqdm(total=len(configs) * len(groups), desc=f"{task} {length}")
    for group in groups:
        for row in rows:
            run_cell(llm, stats, row, group, len(cases), prompt_tokens, max_tokens)
            progress.update()
            # Saved after every cell: a long run stopped early keeps its
            # finished ones (the report shows the missing ones as "-").
            out.write_text(json.dumps(
                {"task": task, "length": length, "cases": cases_n,
                 "engine": {k: v for k, v in engine.items() if k != "model"},
                 "case_groups": len(groups),
                 "rows": [r for r in rows if r["scores"]]}, indent=1) + "\n")
    progress.close()
    return out


def prompt_length(case: dict) -> int:
    return len(case["context"]) + len(case["question"])


def case_groups(pool, cases: list[dict], max_num_seqs: int, max_model_len: int) -> list[list]:
    """The cases split into as few runs of consecutive cases as keep one
    run's prompts in the prefix cache with room for the running requests'
    copies: every configuration then reuses their prefills, and kvzip its
    scores, instead of the cache evicting each prompt before the next
    configuration reaches it (it is least recently used)."""
    capacity = pool.num_head_blocks // pool.heads_per_token_block * pool.block_size
    room = 0.9 * (capacity - max_num_seqs * max_model_len)
    tokens = sum(map(prompt_length, cases))
    count = max(1, math.ceil(tokens / room)) if room > 0 else len(cases)
    size = math.ceil(len(cases) / count)
    return [cases[i:i + size] for i in range(0, len(cases), size)]


def run_cell(llm, stats, row: dict, cases: list[dict], cases_n: int, prompt_tokens: int,
             max_tokens: int) -> None:
    """One configuration (``row``'s policy and rate) on some of the cases;
    their scores and answers are appended to ``row`` and its per-request
    costs accumulate (divided by all ``cases_n`` cases)."""
    from vllm import SamplingParams

    from quality_tasks import score

    extra = {"kv_compress_rate": row["rate"]}
    if row["policy"] != "full":
        extra["kv_compress_policy"] = row["policy"]
    before = (stats.compress_seconds, stats.reconstruction_seconds,
              stats.reconstruction_tokens)
    started = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": c["context"] + c["question"]} for c in cases],
        SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra),
        use_tqdm=False)
    row["seconds_per_request"] += (time.perf_counter() - started) / cases_n
    row["scores"] += [score(o.outputs[0].text, c["answers"]) for c, o in zip(cases, outputs)]
    row["answers"] += [o.outputs[0].text for o in outputs]
    row["compress_seconds_per_request"] += (stats.compress_seconds - before[0]) / cases_n
    row["reconstruction_seconds_per_request"] += (
        stats.reconstruction_seconds - before[1]) / cases_n
    row["reconstruction_tokens_per_prompt_token"] += (
        stats.reconstruction_tokens - before[2]) / prompt_tokens


def mean_se(scores: list[float]) -> tuple[float, float]:
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def report(out_dir: Path) -> None:
    """One markdown table and one plot per task and length, and the cost table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from needle import save_report

    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        rows = data["rows"]
        full = next(r for r in rows if r["policy"] == "full")
        rates = sorted({r["rate"] for r in rows if r["policy"] != "full"})
        policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
        cell = {(r["policy"], r["rate"]): r for r in rows}
        lines = [f"\n**{data['task']}, {data['length']}-token prompts, "
                 f"{data['cases']} cases per cell** (full cache: "
                 f"{_cell_text(full, mean_se(full['scores']), data['cases'])}; "
                 f"{full['seconds_per_request']:.1f} s per request)\n",
                 "| policy | " + " | ".join(f"rate {r:g}" for r in rates)
                 + " | compression s / request | extra tokens / prompt token |",
                 "| --- |" + " --- |" * (len(rates) + 2)]
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in policies:
            cells = [cell.get((policy, r)) for r in rates]
            stats = [mean_se(c["scores"]) if c else None for c in cells]
            done = [c for c in cells if c]
            seconds = sum(c["compress_seconds_per_request"] for c in done) / len(done)
            extra = sum(c["reconstruction_tokens_per_prompt_token"] for c in done) / len(done)
            lines.append(f"| {policy} | " + " | ".join(
                _cell_text(c, st, data["cases"]) for c, st in zip(cells, stats))
                + f" | {seconds:.2f} | {extra:.2f} |")
            have = [(r, st) for r, st in zip(rates, stats) if st]
            ax.errorbar([r for r, _ in have], [st[0] for _, st in have],
                        yerr=[st[1] for _, st in have], fmt="o-", capsize=3, label=policy)
        ax.axhline(mean_se(full["scores"])[0], color="grey", ls="--", label="full cache")
        ax.set(xscale="log", xlabel="compression rate", ylabel="score",
               title=f"{data['task']}, SmolLM2-135M, {data['length']} tokens",
               ylim=(-0.05, 1.05))
        ax.minorticks_off()
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.legend(fontsize=7)
        save_report(fig, lines, path)
        plt.close(fig)


def _cell_text(row: dict | None, stat: tuple | None, cases: int) -> str:
    """A table cell: mean ± standard error, with its case count when a run
    stopped before the cell saw every case."""
    if row is None:
        return "-"
    text = f"{stat[0]:.2f} ± {stat[1]:.2f}"
    return text if len(row["scores"]) == cases else f"{text} (n={len(row['scores'])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["needle", "after", "multikey", "vartrack"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--policies", nargs="+", default=POLICIES,
                        choices=POLICIES + list(VARIANTS))
    parser.add_argument("--out", default="docs/results/quality")
    parser.add_argument("--name", help="results file prefix (default: the task)")
    parser.add_argument("--report", action="store_true",
                        help="only render the tables and plots of earlier runs in --out")
    parser.add_argument("--scorer", help="kvzap's scorer file (default: the bundled one)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    if not args.report:
        if args.task is None:
            parser.error("--task is required unless --report")
        for length in args.lengths:
            run_task(args.task, length, args.cases, args.rates, args.policies, out_dir,
                     args.name, args.scorer)
    report(out_dir)


if __name__ == "__main__":
    main()
