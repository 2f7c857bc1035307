"""The reconstruction benchmark (benchmarks/kernels/bench_reconstruction.py)
runs without vLLM, as it must on the GPU machines, and its check against the
dense reference passes; here on tiny CPU shapes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import runpy, sys
sys.argv = ["bench_reconstruction.py", "--smoke"]
runpy.run_path("benchmarks/kernels/bench_reconstruction.py", run_name="__main__")
assert "vllm" not in sys.modules, "the benchmark imported vLLM"
"""


def test_reconstruction_benchmark_runs_without_vllm():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert set(result["check"]) == {"torch", "torch_small_tiles", "triton"}
    assert all(diff["scores"] < 1e-5 for diff in result["check"].values())
    [row] = result["rows"]
    assert row["tiled_ms"] > 0 and row["one_tile_ms"] > 0 and row["triton_ms"] > 0
