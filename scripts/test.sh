#!/usr/bin/env bash
# Runs every test (sets up .venv first; that step is quick once done).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not engine"`.
# KVCOMPRESS_TEST_WORKERS sets the number of pytest-xdist workers (default:
# one per core, at most 4; 0 runs everything in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash scripts/setup.sh
echo "set-up took $(( $(date +%s) - started )) s"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# vLLM's CPU engine computes in one thread, so one worker per core runs
# twice the engines at once on 2 cores (tests/conftest.py gives each
# worker's engines their own core). Whole files go to one worker, so a
# module's shared engine or server is started once.
cores=$(nproc)
workers=${KVCOMPRESS_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
