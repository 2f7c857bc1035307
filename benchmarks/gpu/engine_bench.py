"""The GPU harness's driver: stock vLLM against the plugin on one
Llama-3.1-8B-shaped model, each engine in its own time-boxed process
(``engine_job.py``), all figures in one JSON.

Steps, in order of importance, each given what is left of ``--budget-s``:
1. stock vLLM (TRITON_ATTN) in its default compiled mode, else
   ``VLLM_USE_AOT_COMPILE=0``, else eager with native custom ops: the
   exactness prompts, a warm-up, then the KV-bound throughput workload;
2. the plugin (``kv_compress_rate=1``) in the mode stock ran in (else the next
   ones): the same exactness prompts (greedy tokens compared with stock's),
   then the workload at each rate of ``--rates`` (set per request) with
   kvzap, the product's default where a model has a scorer (the stand-in
   has no weights to train one on, so it gets an untrained scorer of
   seeded random weights: its cost is real, its choices are not), and each
   of ``--also-policies`` at ``--also-rate``;
3. if time is left and the bf16 tokens differ: the exactness prompts again in
   float32, eager, both engines (rounding no longer hides a real difference).

The KV pool is the same for every engine and holds ``--stock-fits``
uncompressed requests (``num_gpu_blocks_override``), so stock is KV-bound as
on the KV-Compress paper's L4: that card left about 6 GB for KV beside the
8B's weights, the default here is 4.8 GB.

    python benchmarks/gpu/engine_bench.py --out DIR [--dry-run] [--budget-s 400]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import engine_plan
import model_shape
from bench_report import compare_tokens, print_summary, throughput_table

HERE = Path(__file__).resolve().parent
JOB = HERE / "engine_job.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for engine_bench.json "
                   "and engines.log")
    p.add_argument("--budget-s", type=float, default=400, help="seconds for all steps")
    p.add_argument("--prompts", type=int, default=48, help="requests per throughput run")
    p.add_argument("--input-len", type=int, default=6000)
    p.add_argument("--output-len", type=int, default=500)
    p.add_argument("--stock-fits", type=int, default=6,
                   help="uncompressed requests the KV pool holds")
    p.add_argument("--rates", type=float, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--policy", default="kvzap", help="the policy run at every --rates")
    p.add_argument("--also-policies", nargs="*", default=["kvzip", "kvcompress"],
                   help="more policies, each run at --also-rate")
    p.add_argument("--also-rate", type=float, default=8)
    p.add_argument("--modes", nargs="+", default=list(engine_plan.MODES),
                   choices=engine_plan.MODES, help="tried in this order")
    p.add_argument("--exact-lengths", type=int, nargs="+", default=[17, 300, 1500, 4000])
    p.add_argument("--exact-tokens", type=int, default=32)
    p.add_argument("--weights", choices=("normal", "dummy"), default="normal",
                   help="normal: seeded N(0, 0.02) over vLLM's dummy weights")
    p.add_argument("--no-fp32-check", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (every engine's arguments) and exit")
    p.add_argument("--job-script", type=Path, default=JOB,
                   help="the one-engine script (tests pass a stand-in)")
    return p.parse_args(argv)


def kv_blocks(args) -> int:
    per_request = math.ceil((args.input_len + args.output_len) / engine_plan.BLOCK_SIZE)
    return args.stock_fits * per_request + 1  # +1: vLLM's null block


def workload(name: str, args, prompts: int, output_len: int, extra_args=None) -> dict:
    return {"name": name, "prompts": prompts, "input_len": args.input_len,
            "output_len": output_len, "extra_args": extra_args}


def compressed(policy: str, rate: float) -> dict:
    return {"kv_compress_rate": rate, "kv_compress_policy": policy}


def plugin_workloads(args) -> list[dict]:
    runs = [(args.policy, r) for r in args.rates]
    runs += [(policy, args.also_rate) for policy in args.also_policies]
    return [workload(f"{policy}-rate{rate:g}", args, args.prompts, args.output_len,
                     compressed(policy, rate)) for policy, rate in runs]


def uses_kvzap(args) -> bool:
    return "kvzap" in (args.policy, *args.also_policies)


def scorer_path(model: Path) -> Path:
    """Where the stand-in's untrained kvzap scorer is written."""
    return model / "kvzap-untrained.safetensors"


def job_spec(kind: str, mode: str, model: Path, args, *, dtype="bfloat16",
             throughput=True) -> dict:
    """One engine's spec for engine_job.py."""
    sizing = dict(dtype=dtype, max_model_len=args.input_len + args.output_len)
    if throughput:
        sizing["num_blocks"] = kv_blocks(args)
    if kind == "stock":
        engine = engine_plan.stock_args(model, mode, **sizing)
    else:
        engine = engine_plan.plugin_args(model, mode, **sizing)
    spec = {"kind": kind, "mode": mode, "engine": engine,
            "env": engine_plan.env_for(kind, mode), "weights": args.weights,
            "exact": {"lengths": args.exact_lengths, "max_tokens": args.exact_tokens},
            "warmups": [], "workloads": []}
    if kind == "plugin" and uses_kvzap(args):  # written by the plugin's own job
        engine["kv_compress_scorer"] = spec["untrained_scorer"] = str(scorer_path(model))
    if throughput:
        # Two full-length prompts, a few tokens: Triton JIT and compression
        # kernels are compiled before any clock starts.
        if kind == "stock":
            spec["warmups"] = [workload("warmup", args, 2, 8)]
            spec["workloads"] = [workload("stock", args, args.prompts, args.output_len)]
        else:
            spec["warmups"] = [workload(f"warmup-{policy}", args, 2, 8, compressed(policy, 8))
                               for policy in dict.fromkeys([args.policy, *args.also_policies])]
            spec["workloads"] = plugin_workloads(args)
    return spec


def run_job(spec: dict, timeout: float, name: str, log_path: Path, script: Path = JOB) -> dict:
    """engine_job.py in its own process group; its report (partial when it
    died or ran out of time), plus how it ended."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, report_path = Path(tmp) / "spec.json", Path(tmp) / "report.json"
        spec_path.write_text(json.dumps(spec))
        began = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n===== {name} (timeout {timeout:.0f} s) =====\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, str(script), str(spec_path), str(report_path)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                code = proc.wait(timeout=max(timeout, 1))
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code, timed_out = proc.wait(), True
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update(returncode=code, timed_out=timed_out, wall_seconds=time.perf_counter() - began)
    if code != 0:
        report["log_tail"] = log_tail(log_path)
    return report


def log_tail(path: Path, lines: int = 25) -> str:
    return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])


def environment() -> dict:
    """Versions from package metadata (importing vLLM here would cost seconds
    of the budget); the engines report what they ran on as well."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "vllm", "transformers", "pydantic"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = "not installed"
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    return env


class Run:
    """The budget, the report and the log of one invocation."""

    def __init__(self, args):
        self.args, self.deadline = args, time.monotonic() + args.budget_s
        args.out.mkdir(parents=True, exist_ok=True)
        self.log_path = args.out / "engines.log"
        self.report = {"argv": sys.argv[1:], "workload": {
            "model": "Llama-3.1-8B shape, bf16, " + ("seeded normal weights" if args.weights ==
                                                      "normal" else "vLLM dummy weights"),
            "prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
            "kv_pool_blocks": kv_blocks(args), "block_size": engine_plan.BLOCK_SIZE,
            "kv_pool_gib": kv_blocks(args) * engine_plan.BLOCK_SIZE
            * model_shape.kv_bytes_per_token() / 2**30,
            "stock_fits": args.stock_fits}, "steps": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        (self.args.out / "engine_bench.json").write_text(json.dumps(self.report, indent=1) + "\n")

    def job(self, name: str, spec: dict, timeout: float) -> dict:
        say(f"{name}: mode {spec['mode']}, up to {timeout:.0f} s")
        result = run_job(spec, timeout, name, self.log_path, self.args.job_script)
        self.report["steps"].append({"name": name, "mode": spec["mode"], **{
            k: result.get(k) for k in ("started", "finished", "returncode", "timed_out",
                                       "wall_seconds", "startup_seconds", "log_tail")}})
        self.save()
        state = ("finished" if result.get("finished") else
                 "TIMED OUT" if result["timed_out"] else f"FAILED (exit {result['returncode']})")
        say(f"{name}: {state} after {result['wall_seconds']:.0f} s")
        if result.get("log_tail") and not result.get("finished"):
            print(result["log_tail"], flush=True)
        return result

    def with_fallback(self, kind: str, modes: list[str], make_spec, reserve: float,
                      cap: float) -> dict | None:
        """Try ``modes`` in order until an engine starts; say which ran."""
        for mode in modes:
            timeout = min(cap, self.left() - reserve)
            if timeout < 60:
                say(f"{kind}: no time left for mode {mode}")
                return None
            result = self.job(f"{kind}-{mode}", make_spec(mode), timeout)
            if result.get("started"):
                if mode != modes[0]:
                    say(f"{kind}: ran in FALLBACK mode {mode}")
                return result
            say(f"{kind}: mode {mode} did not start; trying the next one")
        return None


def say(message: str) -> None:
    print(f"[engine_bench +{time.monotonic() - START:5.0f} s] {message}", flush=True)


START = time.monotonic()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        model = Path("MODEL_FOLDER")
        plan = {"stock": job_spec("stock", args.modes[0], model, args),
                "plugin": job_spec("plugin", args.modes[0], model, args),
                "fp32_check": [job_spec(k, "eager", model, args, dtype="float32",
                                        throughput=False) for k in ("stock", "plugin")],
                "kv_pool_blocks": kv_blocks(args), "modes": args.modes}
        print(json.dumps(plan, indent=1))
        return
    model = model_shape.write_model(Path(tempfile.mkdtemp(prefix="llama-8b-shape-")))
    run = Run(args)
    run.report["environment"] = environment()
    run.save()
    say(f"environment: {run.report['environment']}")
    stock = run.with_fallback("stock", args.modes, lambda m: job_spec("stock", m, model, args),
                              reserve=150, cap=240)
    first = stock["mode"] if stock else args.modes[0]
    plugin_modes = args.modes[args.modes.index(first):]
    plugins = []
    plugin = run.with_fallback("plugin", plugin_modes,
                               lambda m: job_spec("plugin", m, model, args), reserve=5, cap=1e9)
    if plugin:
        plugins.append(plugin)
        done = set(plugin.get("workloads") or {})
        rest = [w for w in plugin_workloads(args) if w["name"] not in done]
        if rest and not plugin.get("finished") and run.left() > 120:
            spec = job_spec("plugin", plugin["mode"], model, args)
            spec.update(exact=None, workloads=rest)
            say(f"plugin: restarting for {[w['name'] for w in rest]}")
            plugins.append(run.job("plugin-rest", spec, run.left() - 5))
    run.report["stock"], run.report["plugin"] = stock, plugins
    run.report["exact_bf16"] = compare_tokens(stock, plugin)
    run.report["throughput"] = throughput_table(stock, plugins)
    run.save()
    bf16 = run.report["exact_bf16"]
    if not args.no_fp32_check and bf16 is not None and not bf16["identical"] and run.left() > 100:
        pair = {}
        for kind in ("stock", "plugin"):
            spec = job_spec(kind, "eager", model, args, dtype="float32", throughput=False)
            share = run.left() / (2 if kind == "stock" else 1) - 5
            pair[kind] = run.job(f"{kind}-fp32-eager", spec, share)
        run.report["fp32_check"] = pair
        run.report["exact_fp32"] = compare_tokens(pair["stock"], pair["plugin"])
    run.save()
    print_summary(run.report)


if __name__ == "__main__":
    main()
