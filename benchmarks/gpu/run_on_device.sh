#!/usr/bin/env bash
# The GPU harness's one device call: install the carry (.gpu-carry, built here
# by build_carry.py) under a temporary folder, byte-compile it, and run
# engine_bench.py (stock vLLM vs the plugin) inside what is left of
# TOTAL_S seconds (default 450: the call must leave a rerun inside the
# machine's 15 minutes).
#
#   bash benchmarks/gpu/run_on_device.sh OUT_DIR [engine_bench options...]
#   bash benchmarks/gpu/run_on_device.sh --dry-run   (prints the steps and the plan)
# On the device tool: command 'bash benchmarks/gpu/run_on_device.sh $OUT',
# carry [".gpu-carry"], timeout_s 510.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CARRY=${GPU_CARRY:-$REPO/.gpu-carry}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,11p' "$0"; exit 0; fi
OUT=${1:-}
if [ -z "$OUT" ]; then
  [ "$DRY" = 1 ] && OUT=$(mktemp -d) || { echo "usage: $0 OUT_DIR [options]" >&2; exit 2; }
fi
shift || true
if [ "$DRY" = 1 ]; then
  WORK=${WORK:-/tmp/gpu-harness.DRY}
else
  WORK=${WORK:-$(mktemp -d /tmp/gpu-harness.XXXXXX)}
fi
SITE=$WORK/site
TREE=$WORK/tree
mkdir -p "$OUT"

step() { echo "[run_on_device +${SECONDS}s] $*"; }
run() {  # a step's command, or only its text in a dry run
  if [ "$DRY" = 1 ]; then echo "  would run: $*"; else "$@"; fi
}

if [ "$DRY" = 0 ] && [ ! -f "$CARRY/vllm-src.tar.gz" ]; then
  echo "no carry at $CARRY: build it first (.venv/bin/python benchmarks/gpu/build_carry.py)" >&2
  exit 2
fi
step "carry: $CARRY -> $WORK"
run mkdir -p "$TREE" "$SITE"
step "unpack vLLM's sources"
run tar -xzf "$CARRY/vllm-src.tar.gz" -C "$TREE" || exit 1
step "install the carried wheels"
run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" "$CARRY"/wheels/*.whl || exit 1
step "register the plugin (dist-info with its entry point, package links)"
run "$PY" "$REPO/benchmarks/gpu/plugin_dist.py" "$SITE" --repo "$REPO" || exit 1
step "byte-compile"
run "$PY" -m compileall -q -j"${JOBS:-16}" "$TREE" "$SITE" "$REPO/vllm_kvcompress" "$REPO/kernels"
export PYTHONPATH="$TREE:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# No network there: never wait on the Hub or on usage reporting.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
step "check: vLLM sees CUDA"
run "$PY" -c "import vllm, vllm_kvcompress; from vllm.platforms import current_platform as p; \
print('vllm', vllm.__version__, 'from', vllm.__file__, '| platform', type(p).__name__, \
p.get_device_name(), p.get_device_capability())" || exit 1
BUDGET=$((TOTAL_S - SECONDS - 15))
step "engine_bench.py, budget ${BUDGET}s"
if [ "$DRY" = 1 ]; then
  "$PY" "$REPO/benchmarks/gpu/engine_bench.py" --out "$OUT" --dry-run "$@"
  exit $?
fi
timeout --kill-after=10 $((BUDGET + 10)) "$PY" "$REPO/benchmarks/gpu/engine_bench.py" \
  --out "$OUT" --budget-s "$BUDGET" "$@" 2>&1 | tee "$OUT/run.log"
code=${PIPESTATUS[0]}
step "done (exit $code); results in $OUT/engine_bench.json"
exit "$code"
