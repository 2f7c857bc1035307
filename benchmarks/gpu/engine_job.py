"""One vLLM engine in its own process, for the GPU harness (``engine_bench``):
start it, optionally give it seeded normal weights, run the exactness prompts,
warm up, then time each workload; the report is rewritten after every phase,
so a crash or a timeout still leaves what was measured.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
the scheduler's running count and the plugin's compression counters can be
read between steps.

    python benchmarks/gpu/engine_job.py SPEC.json REPORT.json
SPEC: kind ("stock" or "plugin"), mode, engine (LLM keyword arguments), env,
weights ("dummy" or "normal"), exact ({lengths, max_tokens}), warmups and
workloads (each {name, prompts, input_len, output_len, extra_args}), and
untrained_scorer (a path: kvzap's scorer for the stand-in, written here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

WEIGHT_SEED = 20240531
PROMPT_SEED = 7


def log(message: str) -> None:
    print(f"[engine_job {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prompt_ids(index: int, length: int, group: str) -> list[int]:
    """Deterministic random token ids, the same for every engine."""
    import numpy as np

    rng = np.random.default_rng([PROMPT_SEED, index, length, sum(map(ord, group))])
    return rng.integers(1000, 120000, size=length).tolist()


def normal_weights(model) -> int:
    """Seeded N(0, 0.02) matrices, unit norm weights, zero vectors (a freshly
    initialised Llama). vLLM's dummy weights are uniform in +-1e-3, which
    leaves attention almost without effect on the logits, so an exactness
    check on them would show little. Same values in every engine: the same
    parameters, visited in name order, from one seeded generator."""
    import torch

    model = model.unwrap() if hasattr(model, "unwrap") else model  # a CUDA-graph wrapper
    params = sorted(model.named_parameters())
    gen = torch.Generator(device=params[0][1].device).manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, p in params:
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return len(params)


def write_scorer(spec: dict) -> None:
    """The stand-in's untrained kvzap scorer, written in the plugin's own
    process: the driver never imports the plugin, so a plugin that fails to
    import cannot cost stock's figures."""
    path = spec.get("untrained_scorer")
    if path and not Path(path).exists():
        from vllm_kvcompress.kvzap.untrained import write_untrained_scorer

        write_untrained_scorer(spec["engine"]["model"], path)


def engine_facts(llm) -> dict:
    """What vLLM resolved: the mode each figure comes from."""
    import torch
    import triton
    import vllm.envs as envs

    config = llm.llm_engine.vllm_config
    cc = config.compilation_config
    return {
        "compilation_mode": int(cc.mode), "cudagraph_mode": str(cc.cudagraph_mode),
        "enforce_eager": config.model_config.enforce_eager,
        "attention_backend": str(config.attention_config.backend),
        "block_size": config.cache_config.block_size,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "async_scheduling": config.scheduler_config.async_scheduling,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "v2_model_runner": config.use_v2_model_runner,
        "aot_compile": envs.VLLM_USE_AOT_COMPILE,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__,
    }


def run_exact(llm, spec: dict) -> dict:
    """Greedy tokens of the exactness prompts, with each step's top-2
    log-probabilities (to tell a near tie from a real difference)."""
    from vllm import SamplingParams

    exact = spec["exact"]
    prompts = [{"prompt_token_ids": prompt_ids(i, n, "exact")}
               for i, n in enumerate(exact["lengths"])]
    params = SamplingParams(temperature=0.0, max_tokens=exact["max_tokens"],
                            ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out in outs:
        completion = out.outputs[0]
        top = [sorted(((lp.logprob, tok) for tok, lp in step.items()), reverse=True)[:2]
               for step in completion.logprobs]
        result.append({"tokens": list(completion.token_ids),
                       "top2": [[[t, round(v, 5)] for v, t in s] for s in top]})
    return {"lengths": exact["lengths"], "outputs": result}


def compression_counters(scheduler) -> dict | None:
    stats = getattr(scheduler, "stats", None)
    if stats is None:
        return None
    return {key: float(getattr(stats, key)) for key in (
        "compress_seconds", "reconstruction_seconds", "compressions",
        "low_memory_compressions", "reconstruction_tokens", "kvs_evicted")}


def run_workload(llm, work: dict) -> dict:
    """All prompts at once, stepped until done: tokens/s and peak batch."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=work["output_len"], ignore_eos=True,
                            extra_args=work.get("extra_args") or None)
    for i in range(work["prompts"]):
        engine.add_request(f"{work['name']}-{i}",
                           {"prompt_token_ids": prompt_ids(i, work["input_len"], "load")},
                           params)
    before = compression_counters(scheduler)
    peak = steps = generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        peak = max(peak, len(scheduler.running))
        steps += 1
    seconds = time.perf_counter() - start
    report = {"seconds": seconds, "output_tokens": generated, "steps": steps,
              "peak_running": peak, "output_tokens_per_s": generated / seconds,
              "total_tokens_per_s": (generated + work["prompts"] * work["input_len"]) / seconds}
    after = compression_counters(scheduler)
    if after is not None:
        delta = {k: after[k] - before[k] for k in after}
        report["compression"] = delta
        report["compress_share"] = delta["compress_seconds"] / seconds
        report["kvzip_pass_share"] = delta["reconstruction_seconds"] / seconds
    return report


def main(spec_path: str, report_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(report_path)
    report = {"kind": spec["kind"], "mode": spec["mode"], "started": False,
              "engine_args": spec["engine"], "env": spec["env"]}

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)

    os.environ.update(spec["env"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    save()
    if spec["kind"] == "plugin":
        import vllm_kvcompress  # noqa: F401  (the LLM(kv_compress_rate=...) keyword)

        write_scorer(spec)
    from vllm import LLM

    log(f"{spec['kind']}: starting the engine in mode {spec['mode']}")
    began = time.perf_counter()
    llm = LLM(**spec["engine"])
    report.update(started=True, startup_seconds=time.perf_counter() - began,
                  facts=engine_facts(llm))
    log(f"started in {report['startup_seconds']:.0f} s: {report['facts']}")
    if spec.get("weights") == "normal":  # the same values in every engine
        report["normal_weights"] = llm.apply_model(normal_weights)[0]
    save()
    if spec.get("exact"):
        report["exact"] = run_exact(llm, spec)
        log("exactness prompts done")
        save()
    for work in spec.get("warmups", []):
        began = time.perf_counter()
        run_workload(llm, work)
        report.setdefault("warmup_seconds", {})[work["name"]] = time.perf_counter() - began
        save()
    report["workloads"] = {}
    for work in spec.get("workloads", []):
        log(f"workload {work['name']}: {work['prompts']} x {work['input_len']} tokens, "
            f"{work['output_len']} new, {work.get('extra_args')}")
        report["workloads"][work["name"]] = result = run_workload(llm, work)
        log(f"  {result['seconds']:.1f} s, {result['output_tokens_per_s']:.0f} new tokens/s, "
            f"peak batch {result['peak_running']}")
        save()
    report["finished"] = True
    save()


if __name__ == "__main__":
    main(*sys.argv[1:3])
