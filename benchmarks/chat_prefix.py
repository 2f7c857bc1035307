"""Multi-turn chats sharing a long system prompt, with a KV pool that binds:
stock vLLM with prefix caching (its default) vs the plugin with prefix
caching at several rates vs the plugin at the highest rate without it, in
one run.

Every conversation starts with the same system prompt; turn t of all
conversations is sent together once turn t-1 has finished, and each turn's
prompt is the previous prompt, the answer the engine actually gave, and a
new user message. Reported per engine: output tokens/s (ratio to stock),
mean time to first token, prefix-cache hit rate (cached prompt tokens /
prompt tokens), peak running requests, and for the plugin the tokens
kvzip's reconstruction passes re-read and their share of the run. Each
engine runs in its own process with vLLM's defaults (compiled model).

    python benchmarks/chat_prefix.py [--conversations 16] [--system-len 2048]
        [--user-len 128] [--turns 4] [--output-len 64] [--stock-fits 4]
        [--rates 4 8] [--out docs/results/chat-prefix.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from throughput import BLOCK, make_prompts, run_engine


def worker(spec_path: str, out_path: str) -> None:
    """One engine: every turn of every conversation, turn by turn."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler is readable
    import vllm_kvcompress  # noqa: F401
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager
    lookup, cached = manager.get_computed_blocks, {}

    def get_computed_blocks(request):
        found = lookup(request)
        cached[request.request_id] = found[1]  # the last lookup counts
        return found

    manager.get_computed_blocks = get_computed_blocks
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    history = [list(spec["system"]) for _ in spec["users"]]
    prompt_tokens = generated = peak = 0
    first_token_waits = []
    start = time.perf_counter()
    for turn in range(spec["turns"]):
        sent, answers = {}, {}
        for conv, users in enumerate(spec["users"]):
            history[conv] = history[conv] + users[turn]
            rid = f"{conv}-{turn}"
            engine.add_request(rid, {"prompt_token_ids": history[conv]}, params)
            sent[rid] = time.perf_counter()
            prompt_tokens += len(history[conv])
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = out.outputs[0].token_ids
                if tokens and out.request_id in sent:
                    first_token_waits.append(time.perf_counter() - sent.pop(out.request_id))
                if out.finished:
                    answers[out.request_id] = list(tokens)
                    generated += len(tokens)
            peak = max(peak, len(scheduler.running))
        for conv in range(len(spec["users"])):
            history[conv] = history[conv] + answers[f"{conv}-{turn}"]
    elapsed = time.perf_counter() - start
    report = {
        "seconds": elapsed, "tokens": generated, "peak_running": peak,
        "mean_ttft": sum(first_token_waits) / len(first_token_waits),
        "hit_rate": sum(cached.values()) / prompt_tokens,
    }
    stats = getattr(scheduler, "stats", None)
    if stats is not None:  # the plugin's engine: what kvzip's passes re-read
        report.update(reconstruction_tokens=stats.reconstruction_tokens,
                      reconstruction_share=stats.reconstruction_seconds / elapsed)
    Path(out_path).write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--system-len", type=int, default=2048)
    parser.add_argument("--user-len", type=int, default=128)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--stock-fits", type=int, default=4,
                        help="whole conversations (at their last turn) the pool holds")
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 8])
    parser.add_argument("--policy", default="kvcompress",
                        help="--kv-compress-policy (the published figures: kvcompress)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/chat-prefix.json"))
    args = parser.parse_args()

    from vllm_kvcompress.assets import smollm2_path

    model = smollm2_path()
    pieces = make_prompts(model, 1 + args.conversations * args.turns,
                          max(args.system_len, args.user_len))
    system = pieces[0][: args.system_len]
    users = [[pieces[1 + c * args.turns + t][: args.user_len] for t in range(args.turns)]
             for c in range(args.conversations)]
    longest = args.system_len + args.turns * (args.user_len + args.output_len)
    blocks = args.stock_fits * math.ceil(longest / BLOCK) + 1  # +1: vLLM's null block
    engine = dict(dtype="float32", max_model_len=longest + BLOCK, block_size=BLOCK,
                  num_gpu_blocks_override=blocks)
    base = {"model": model, "system": system, "users": users, "turns": args.turns,
            "output_len": args.output_len}
    top = max(args.rates)
    engines = [("stock", {})]
    policy = {"kv_compress_policy": args.policy}
    engines += [(f"rate {r:g}", {"kv_compress_rate": r, **policy}) for r in args.rates]
    engines += [(f"rate {top:g}, no prefix caching",
                 {"kv_compress_rate": top, "enable_prefix_caching": False, **policy})]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(engines):
            print(f"running {name} ...", flush=True)
            results[name] = run_engine({**base, "engine": {**engine, **extra}}, Path(tmp),
                                       f"e{i}", script=__file__)
    stock_rate = results["stock"]["tokens"] / results["stock"]["seconds"]
    print(f"{'engine':34} {'tok/s':>7} {'ratio':>6} {'TTFT s':>7} {'hits':>5} {'peak':>4}")
    for name, r in results.items():
        r["ratio"] = r["tokens"] / r["seconds"] / stock_rate
        print(f"{name:34} {r['tokens'] / r['seconds']:7.1f} {r['ratio']:6.2f} "
              f"{r['mean_ttft']:7.2f} {r['hit_rate']:5.2f} {r['peak_running']:4d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "results": results}, indent=1))
    plot(results, args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    """One bar chart per figure, an engine per bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ratio", "output tok/s / stock"), ("mean_ttft", "mean TTFT (s)"),
              ("hit_rate", "prefix-cache hit rate"), ("peak_running", "peak running")]
    names = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(range(len(names)), [results[n][key] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
