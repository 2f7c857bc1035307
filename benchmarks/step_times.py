"""Where an engine's time goes, step by step: seconds in steps that carry
prompt tokens, and the median decode step by number of requests decoding.

Explains the throughput ratios of ``throughput.py``: compression lets more
requests decode together, which pays only as far as a decode step of n
requests costs less than n steps of one. Same workload and pool as
``throughput.py``; each engine in a fresh process.

    python benchmarks/step_times.py [--rates 8] [--output-len 512] [--ample]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from throughput import add_workload_args, request_blocks, run_engine, workload


def worker(spec_path: str, out_path: str) -> None:
    """One engine: time every step, note what the scheduler put in it."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm_kvcompress  # noqa: F401
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    scheduled: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def noting_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        scheduled.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out

    scheduler.schedule = noting_schedule
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    for i, ids in enumerate(spec["prompts"]):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    prompt_seconds, decode = 0.0, defaultdict(list)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        before, began = len(scheduled), time.perf_counter()
        engine.step()
        if len(scheduled) == before:
            continue
        seconds = time.perf_counter() - began
        tokens, requests = scheduled[-1]
        if tokens == requests:
            decode[requests].append(seconds)
        else:
            prompt_seconds += seconds
    Path(out_path).write_text(json.dumps({
        "seconds": time.perf_counter() - start,
        "prompt_step_seconds": prompt_seconds,
        "decode": {n: {"steps": len(v), "median_ms": 1e3 * sorted(v)[len(v) // 2],
                       "seconds": sum(v)} for n, v in sorted(decode.items())},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description="per-step times of stock vLLM and the plugin")
    add_workload_args(parser, rates=[8], output_len=512)
    parser.add_argument("--ample", action="store_true",
                        help="also stock vLLM with a pool that holds every request")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    engine, base = workload(args)
    variants = [("stock", engine)] + [
        (f"rate{r:g}", {**engine, "kv_compress_rate": r,
                        "kv_compress_policy": args.policy}) for r in args.rates]
    if args.ample:
        variants.append(("stock-ample", {**engine, "num_gpu_blocks_override":
                                         args.prompts * request_blocks(args) + 1}))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine_args in variants:
            report[name] = run_engine({**base, "engine": engine_args}, Path(tmp), name,
                                      script=__file__)
            print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
