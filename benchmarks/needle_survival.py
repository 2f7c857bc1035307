"""Why a policy finds a needle or not: for every needle prompt, which layers
kept the needle's number after the prompt's compression, next to whether the
answer had it.

Runs the cases of ``needle.py`` (same haystacks for a given length and
needle count) in one in-process engine and records, at each request's first
compression, the KVs each layer kept and how many of the number's digit
tokens survived in each (layer, KV head). The summary gives the found rate
with its binomial standard error and, per policy and rate, each layer's
share of the kept KVs and of the surviving digits; the plot shows the
latter two by layer.

    python benchmarks/needle_survival.py [--length 2048] [--needles 100]
        [--rates 2 4] [--policies kvcompress adakv snapkv cake]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from needle import make_cases, policy_args, save_report  # noqa: E402


def digit_positions(tokenizer, case: dict) -> list[int]:
    """Prompt positions of the needle's number tokens."""
    return [at for at, token in zip(case["needle"], case["needle_ids"])
            if tokenizer.decode([token]).strip().isdigit()]


def install_recorder(records: dict) -> None:
    """Record, per request, the token positions each (layer, head) holds
    right after its first compression (the one after the prompt)."""
    from vllm_kvcompress.compression.compressor import Compressor
    from vllm_kvcompress.worker.runner import HeadPagedRunnerMixin

    order_of_ids: list[str] = []
    original_step, original_compress = HeadPagedRunnerMixin._compress, Compressor.compress

    def step(self, message):
        order_of_ids[:] = list(message.compress) if message.compress else []
        return original_step(self, message)

    def compress(self, table, window, order):
        evicted = original_compress(self, table, window, order)
        request = order_of_ids.pop(0).split("-")[0]  # "<n>-<hash>" -> LLM's n
        if order.after_prompt and request not in records:
            bs = table.block_size
            width = int(table.lens.max())
            logical = np.arange(width)
            slots = table.table[:, :, logical // bs].astype(np.int64) * bs + logical % bs
            held = logical[None, None, :] < table.lens[..., None]
            positions = self.kv_position.view(-1)[np.where(held, slots, 0)].numpy()
            records[request] = np.where(held, positions, -1)
        return evicted

    HeadPagedRunnerMixin._compress, Compressor.compress = step, compress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--needles", type=int, default=100)
    parser.add_argument("--rates", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--policies", nargs="+",
                        default=["kvcompress", "adakv", "snapkv", "cake"])
    parser.add_argument("--out", default="docs/results/needle-survival-2k.json")
    parser.add_argument("--report", metavar="JSON",
                        help="only render the summary and plot of an earlier run")
    args = parser.parse_args()
    if args.report:
        return report(Path(args.report))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # patch the worker in-process

    import vllm_kvcompress  # noqa: F401
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.assets import smollm2_path

    records: dict[str, np.ndarray] = {}
    install_recorder(records)
    model = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, dtype="float32", max_model_len=args.length + 64,
              kv_compress_rate=2, max_num_seqs=8)
    cases = make_cases(tokenizer, args.length, args.needles, seed=args.length)
    configs = [("full", 1.0)] + [(p, r) for r in args.rates for p in args.policies]
    jobs = [(policy, rate, case) for policy, rate in configs for case in cases]
    results = []
    with tqdm(total=len(jobs), desc=f"{args.length}-token needles") as bar:
        for i in range(0, len(jobs), 32):
            batch = jobs[i:i + 32]
            params = [SamplingParams(temperature=0.0, max_tokens=12, extra_args={
                "kv_compress_rate": rate,
                **(policy_args(policy) if policy != "full" else {})})
                for policy, rate, _ in batch]
            outputs = llm.generate([{"prompt_token_ids": c["ids"]} for _, _, c in batch],
                                   params, use_tqdm=False)
            for (policy, rate, case), out in zip(batch, outputs):
                row = {"policy": policy, "rate": rate, "depth": case["depth"],
                       "found": case["number"] in out.outputs[0].text}
                kept = records.get(out.request_id.split("-")[0])
                if kept is not None:
                    digits = np.array(digit_positions(tokenizer, case))
                    row["kept_per_layer"] = (kept >= 0).sum(axis=(1, 2)).tolist()
                    # [L, H]: how many of the digits each head still holds
                    row["digits_per_head"] = np.isin(kept, digits).sum(axis=2).tolist()
                    row["num_digits"] = len(digits)
                results.append(row)
            bar.update(len(batch))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"length": args.length, "cases": results}) + "\n")
    report(Path(args.out))


def digit_shares(rows: list[dict]) -> np.ndarray:
    """[N, L, H]: the share of its needle's digits each head kept."""
    heads = np.array([r["digits_per_head"] for r in rows], dtype=float)
    return heads / np.array([r["num_digits"] for r in rows], dtype=float)[:, None, None]


def key_head(rows: list[dict]) -> tuple[int, int]:
    """The (layer, KV head) whose keeping every digit best predicts a found
    needle, over all compressed cases (found from the data, not assumed)."""
    shares = digit_shares(rows)
    whole = (shares == 1).reshape(len(rows), -1).astype(float)
    found = np.array([r["found"] for r in rows], dtype=float)
    spread = whole.std(0) * found.std()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(spread > 0, ((whole - whole.mean(0)) * (found - found.mean())[:, None])
                        .mean(0) / spread, -1)
    return tuple(int(i) for i in np.unravel_index(np.argmax(corr), shares.shape[1:]))


def sign_test(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Paired cases found by only a, only b, and the exact two-sided p."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return only_a, only_b, p


def report(path: Path) -> None:
    """Found rate +- SE, how often the key head kept the whole number, paired
    comparisons with the first policy, and by layer the shares of kept KVs
    and of surviving digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    groups: dict[tuple, list] = {}
    for row in data["cases"]:
        groups.setdefault((row["policy"], row["rate"]), []).append(row)
    layer, head = key_head([r for r in data["cases"] if "digits_per_head" in r])
    lines = [f"**{data['length']}-token haystacks**; key head: layer {layer}, KV head {head}\n",
             "| policy | rate | found | SE | digits kept (all heads) | key head keeps "
             "the number | found if it does | found if not |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (policy, rate), rows in groups.items():
        found = np.array([r["found"] for r in rows])
        se = math.sqrt(found.mean() * (1 - found.mean()) / len(rows))
        line = f"| {policy} | {rate:g} | {found.mean():.2f} | {se:.2f} |"
        if "digits_per_head" not in rows[0]:
            lines.append(line + " (not compressed) | | | |")
            continue
        share = digit_shares(rows)
        kept_number = share[:, layer, head] == 1
        rate_if = [f"{found[m].mean():.2f}" if m.any() else "-"
                   for m in (kept_number, ~kept_number)]
        lines.append(line + f" {share.mean():.2f} | {kept_number.mean():.2f} | "
                     + " | ".join(rate_if) + " |")
        label = f"{policy} rate {rate:g}"
        axes[0].plot(share.mean(axis=(0, 2)), label=label)
        kept = np.array([r["kept_per_layer"] for r in rows], dtype=float)
        axes[1].plot((kept / kept.sum(1, keepdims=True)).mean(0), label=label)
    first = next(p for p, _ in groups if p != "full")
    lines += ["", f"Paired with {first} (same needles): found by only one of the two, "
              "exact sign-test p\n", "| rate | other | only " + first
              + " | only other | p |", "| --- | --- | --- | --- | --- |"]
    for (policy, rate), rows in groups.items():
        if policy not in ("full", first) and (first, rate) in groups:
            mine = [r["found"] for r in groups[(first, rate)]]
            a, b, p = sign_test(mine, [r["found"] for r in rows])
            lines.append(f"| {rate:g} | {policy} | {a} | {b} | {p:.3f} |")
    axes[0].set(xlabel="layer", ylabel="needle digits kept (mean over heads, cases)",
                ylim=(-0.05, 1.05))
    axes[1].set(xlabel="layer", ylabel="share of the request's kept KVs")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, {data['length']}-token needle prompts, after compression")
    save_report(fig, lines, path)


if __name__ == "__main__":
    main()
