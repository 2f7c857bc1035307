"""Train kvzap's scorer for a model from the engine's own kvzip pass.

    python -m vllm_kvcompress.train_scorer MODEL --out FILE [--texts FILE ...]
        [--lengths 1024 2048] [--max-windows N] [--features all] [--dtype float32]

The model reads windows of real text (``kvzap/corpus.py``: not the quality
suite's essays) through vLLM with ``--kv-compress-policy kvzip``. After each
prompt, kvzip's reconstruction pass scores every KV; the engine's compressor
hands those scores, with the features of the same KVs read from the pool,
to running ridge sums (``kvzap/teacher.py``). One ridge model per layer is
then fit in closed form, each feature set is measured on held-out windows
(R^2 per layer), and the chosen one is written with its metadata
(``kvzap/scorer_file.py``). Pass the file with ``--kv-compress-scorer``, or
put it in ``vllm_kvcompress/kvzap/data/`` to have it found without a flag.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
QUESTION = "\n\nWhat is the text above about?"
# kvzip's pass ranks the first tokens highest; it always keeps them, so they
# are not samples.
SINKS = 4


def install_capture(worker):
    """Worker side: hook a ``TeacherCapture`` into the compressor; returns
    the rotary pairing the features use."""
    import torch

    from vllm_kvcompress.kvzap.features import rotary_spec_of, token_features
    from vllm_kvcompress.kvzap.teacher import TeacherCapture

    runner = worker.model_runner
    pool = runner.head_cache
    rotary = rotary_spec_of(runner.model, pool.head_dim)
    layers, heads = runner.batch_tables.num_layers, runner.batch_tables.num_kv_heads
    one_token = torch.zeros(heads, 1, pool.head_dim)
    width = token_features(one_token, one_token, rotary).shape[1]
    runner.compressor.teacher = TeacherCapture(
        pool, runner.compressor.layout, rotary, layers, heads, width, SINKS)
    return rotary


def set_split(worker, split: str):
    worker.model_runner.compressor.teacher.split = split


def take_capture(worker):
    capture = worker.model_runner.compressor.teacher
    worker.model_runner.compressor.teacher = None
    return capture


def prompts_of(tokenizer, texts: dict[str, str], lengths: list[int], validation: float,
               max_windows: int | None):
    """Chat prompts (token ids) of the windows, per split, and how many
    windows of each text each split took; at most ``max_windows`` in all,
    the held-out share kept."""
    from vllm_kvcompress.kvzap.corpus import windows

    splits, sources = {"train": [], "validation": []}, {"train": [], "validation": []}
    for name, text in texts.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        for split, chunk in zip(splits, windows(ids, lengths, validation)):
            splits[split] += chunk
            sources[split] += [name] * len(chunk)
    if max_windows is not None:  # the texts in order, each split's first windows
        share = len(splits["validation"]) / max(1, sum(map(len, splits.values())))
        held = max(1, round(max_windows * share))
        for split, count in (("train", max_windows - held), ("validation", held)):
            splits[split], sources[split] = splits[split][:count], sources[split][:count]
    used = {split: {name: names.count(name) for name in dict.fromkeys(names)}
            for split, names in sources.items()}

    def prompt(window: list[int]) -> list[int]:
        message = tokenizer.decode(window) + QUESTION
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                            add_generation_prompt=True, tokenize=True)
        return list(getattr(ids, "input_ids", ids))

    return {split: [prompt(w) for w in chunk] for split, chunk in splits.items()}, used


def run_teacher(llm, splits, batch: int):
    """Every window through the engine, a progress bar over tokens."""
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Two tokens: the compression after the prompt runs before the request ends.
    params = SamplingParams(max_tokens=2, temperature=0.0)
    total = sum(len(p) for prompts in splits.values() for p in prompts)
    with tqdm(total=total, unit="tok", desc="kvzip teacher") as bar:
        for split, prompts in splits.items():
            llm.collective_rpc(set_split, args=(split,))
            for first in range(0, len(prompts), batch):
                group = prompts[first:first + batch]
                llm.generate([TokensPrompt(prompt_token_ids=p) for p in group], params,
                             use_tqdm=False)
                bar.update(sum(map(len, group)))


def fit_all(capture, rotary, num_heads: int, head_dim: int):
    """Every feature set at every alpha: fit on train, R^2 per layer on the
    held-out windows. Returns {feature set: (alpha, r2 [L], weights, bias)}
    with each set's best alpha."""
    from vllm_kvcompress.kvzap.features import FEATURE_SETS, feature_columns
    from vllm_kvcompress.kvzap.ridge import fit, r_squared

    results = {}
    for feature_set in FEATURE_SETS:
        columns = [feature_columns(feature_set, num_heads, head_dim, rotary, h)
                   for h in range(num_heads)]
        best = None
        for alpha in ALPHAS:
            weights, bias = fit(capture.sums["train"], columns, alpha)
            r2 = r_squared(capture.sums["validation"], weights, bias)
            if best is None or r2.mean() > best[1].mean():
                best = (alpha, r2, weights, bias)
        results[feature_set] = best
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model name or path, as given to vllm serve")
    parser.add_argument("--out", required=True, help="the scorer file to write (.safetensors)")
    parser.add_argument("--texts", nargs="+",
                        help="plain-text files to train on (default: kvzap/corpus.py's)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048],
                        help="window lengths in tokens, cycled through")
    parser.add_argument("--max-windows", type=int, help="cap on the number of windows")
    parser.add_argument("--validation", type=float, default=0.2,
                        help="share of each text (its end) held out for R^2")
    parser.add_argument("--features", default="all", help="feature set to write")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8, help="windows per generate call")
    args = parser.parse_args(argv)

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the capture lives in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import torch
    from transformers import AutoTokenizer

    import vllm_kvcompress  # noqa: F401  (LLM takes the kv_compress keywords)
    from vllm import LLM
    from vllm_kvcompress.kvzap.corpus import default_texts
    from vllm_kvcompress.kvzap.features import FEATURE_SETS
    from vllm_kvcompress.kvzap.scorer_file import model_identity, save_scorer

    if args.features not in FEATURE_SETS:
        parser.error(f"--features must be one of {', '.join(FEATURE_SETS)}")
    texts = ({Path(p).name: Path(p).read_text(encoding="utf-8") for p in args.texts}
             if args.texts else default_texts())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits, windows_used = prompts_of(tokenizer, texts, args.lengths, args.validation,
                                      args.max_windows)
    if not splits["train"] or not splits["validation"]:
        parser.error("the texts are too short for one training and one held-out window "
                     "at these --lengths")
    started = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=max(args.lengths) + 128,
              enable_prefix_caching=False, kv_compress_rate=2, kv_compress_policy="kvzip")
    rotary = llm.collective_rpc(install_capture)[0]
    run_teacher(llm, splits, args.batch)
    capture = llm.collective_rpc(take_capture)[0]
    teacher_seconds = time.perf_counter() - started
    hf_config = llm.llm_engine.model_config.hf_config
    identity = model_identity(hf_config)
    num_heads, head_dim = identity["num_key_value_heads"], identity["head_dim"]
    results = fit_all(capture, rotary, num_heads, head_dim)

    print(f"\nheld-out R^2 per layer (kvzip log score), {capture.tokens['train']} training "
          f"and {capture.tokens['validation']} held-out tokens:")
    print(f"{'features':<10} {'alpha':>7} {'mean':>6} {'min':>6}  per layer")
    for name, (alpha, r2, _, _) in results.items():
        print(f"{name:<10} {alpha:>7g} {r2.mean():6.3f} {r2.min():6.3f}  "
              + " ".join(f"{x:.2f}" for x in r2.tolist()))
    alpha, r2, weights, bias = results[args.features]
    save_scorer(args.out, weights, bias, {
        "model": {"name": args.model, "identity": identity},
        "rotary": rotary.to_json(),
        "features": args.features,
        "target": f"log(max(kvzip score, {1e-6:g})): the best attention probability any "
                  "query of kvzip's reconstruction pass (any head of the GQA group) gives "
                  "the KV",
        "alpha": alpha,
        "validation_r2": r2.tolist(),
        "feature_sets_r2": {name: res[1].tolist() for name, res in results.items()},
        "training": {"windows_per_text": windows_used, "lengths": args.lengths,
                     "requests": capture.requests, "tokens": capture.tokens,
                     "teacher_seconds": round(teacher_seconds, 1),
                     "torch": torch.__version__},
    })
    print(f"wrote {args.out} (features {args.features}, alpha {alpha:g}, held-out R^2 "
          f"mean {r2.mean():.3f}); teacher pass {teacher_seconds:.0f} s")


if __name__ == "__main__":
    main()
