"""The compression benchmark (benchmarks/kernels/bench_compression.py) runs the
engine's Compressor with the Triton ops without vLLM, as it must on the GPU
machines; here on tiny shapes in Triton's interpreter."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import runpy, sys
sys.argv = ["bench_compression.py", "--smoke"]
runpy.run_path("benchmarks/kernels/bench_compression.py", run_name="__main__")
assert "vllm" not in sys.modules, "the benchmark imported vLLM"
"""


def test_compression_benchmark_runs_without_vllm():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["evicted_kvs"] > 0
    assert result["compress_ms"] > 0 and result["decode_attention_ms"] > 0
    assert result["step_compress_ms_together"] > 0 and result["step_compress_ms_one_by_one"] > 0
