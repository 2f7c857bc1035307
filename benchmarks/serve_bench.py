"""``vllm bench serve`` (vLLM's own client, random dataset) against ``vllm
serve``: stock vLLM in its default settings vs the plugin, in one run.

Each configuration gets a fresh server on the bundled SmolLM2-135M; the
client sends every prompt at once (request rate inf) and its saved result
gives output tokens/s. Two KV pools: ``short`` holds ``--stock-fits``
uncompressed requests (stock's default 128-token blocks; the plugin gets
the same bytes in its 32-token head-blocks), ``ample`` is
``VLLM_CPU_KVCACHE_SPACE`` GiB (every request fits). Stock runs first and
last in each pool; ratios use the mean of its two runs.

    python benchmarks/serve_bench.py [--configs stock kvzap:8 kvcompress:8]
        [--pools short ample] [--prompts 12] [--input-len 1500] [--output-len 256]
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
import urllib.request
from pathlib import Path

STOCK_BLOCK, PLUGIN_BLOCK = 128, 32
BIN = Path(sys.executable).parent


def pool_args(pool: str, plugin: bool, args) -> list[str]:
    if pool == "ample":
        return []
    blocks = args.stock_fits * math.ceil((args.input_len + args.output_len) / STOCK_BLOCK) + 1
    if plugin:  # the same bytes in head-blocks of 32 tokens
        blocks *= STOCK_BLOCK // PLUGIN_BLOCK
    return ["--num-gpu-blocks-override", str(blocks)]


def server_args(config: str, pool: str, model: str, port: int, args) -> list[str]:
    """``stock`` or ``POLICY:RATE``."""
    cmd = [str(BIN / "vllm"), "serve", model, "--dtype", "float32", "--port", str(port),
           "--max-model-len", str(args.input_len + args.output_len + 64)]
    if config != "stock":
        policy, rate = config.split(":")
        cmd += ["--kv-compress-rate", rate, "--kv-compress-policy", policy]
    return cmd + pool_args(pool, config != "stock", args)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError("server did not become ready")


def kv_compress_metrics(port: int) -> dict:
    """The plugin's counters from the server's /metrics (empty for stock)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("vllm:kv_compress_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name.split("{")[0]] = found.get(name.split("{")[0], 0.0) + float(value)
    return found


def run_one(config: str, pool: str, model: str, args, tmp: Path, log, port: int) -> dict:
    server = subprocess.Popen(server_args(config, pool, model, port, args),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, server)
        name = f"{config.replace(':', '-')}-{pool}.json"
        client = [str(BIN / "vllm"), "bench", "serve", "--backend", "vllm", "--model", model,
                  "--port", str(port), "--dataset-name", "random",
                  "--random-input-len", str(args.input_len),
                  "--random-output-len", str(args.output_len),
                  "--num-prompts", str(args.prompts), "--request-rate", "inf",
                  "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result",
                  "--result-dir", str(tmp), "--result-filename", name]
        subprocess.run(client, check=True, stdout=log, stderr=subprocess.STDOUT)
        result = json.loads((tmp / name).read_text())
        return {"config": config, "pool": pool,
                "output_tokens_per_s": result["output_throughput"],
                "duration_s": result["duration"], "completed": result["completed"],
                "kv_compress": kv_compress_metrics(port)}
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["kvzap:8", "kvcompress:8"],
                        help="plugin configurations POLICY:RATE (stock always runs)")
    parser.add_argument("--pools", nargs="+", default=["short", "ample"])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--input-len", type=int, default=1500)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--stock-fits", type=int, default=3)
    parser.add_argument("--out", default="docs/results/serve-bench.json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vllm_kvcompress.assets import smollm2_path

    model = smollm2_path()
    plan = [(c, p) for p in args.pools for c in ["stock", *args.configs, "stock"]]
    runs = []
    log_path = Path(tempfile.gettempdir()) / "serve_bench.log"
    print(f"server and client output: {log_path}")
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
        for index, (config, pool) in enumerate(tqdm(plan, desc="servers", unit="server")):
            runs.append(run_one(config, pool, model, args, Path(tmp), log, 8300 + index))
    report = {"workload": vars(args), "runs": runs, "ratios": {}}
    for pool in args.pools:
        stock = [r["output_tokens_per_s"] for r in runs
                 if r["pool"] == pool and r["config"] == "stock"]
        base = sum(stock) / len(stock)
        report["ratios"][pool] = {r["config"]: r["output_tokens_per_s"] / base
                                  for r in runs if r["pool"] == pool and r["config"] != "stock"}
        report["ratios"][pool]["stock_runs_spread"] = max(stock) / min(stock)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ratios"], indent=1))


if __name__ == "__main__":
    main()
