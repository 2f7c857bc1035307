"""The kvzip benchmarks (benchmarks/kernels/bench_reconstruction.py and
bench_kvzip_pass.py) run without vLLM, as they must on the GPU machines, and
their checks pass; here on tiny CPU shapes with the kernels interpreted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import runpy, sys
sys.argv = ["{script}", "--smoke"]
runpy.run_path("benchmarks/kernels/{script}", run_name="__main__")
assert "vllm" not in sys.modules, "the benchmark imported vLLM"
"""


def smoke(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECK.format(script=script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_reconstruction_benchmark_runs_without_vllm():
    result = smoke("bench_reconstruction.py")
    assert set(result["check"]) == {"torch", "torch_small_tiles", "triton"}
    assert all(diff["scores"] < 1e-5 for diff in result["check"].values())
    [row] = result["rows"]
    assert row["tiled_ms"] > 0 and row["one_tile_ms"] > 0 and row["triton_ms"] > 0


def test_kvzip_pass_benchmark_runs_without_vllm():
    [row] = smoke("bench_kvzip_pass.py")["rows"]
    assert row["prefill_s"] > 0 and row["kvzip_pass_s"] > 0
    assert row["share_of_kvs_scored"] == 1.0
