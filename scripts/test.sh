#!/usr/bin/env bash
# Runs every test (sets up .venv first; that step is quick once done).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not engine"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m pytest -q "$@"
