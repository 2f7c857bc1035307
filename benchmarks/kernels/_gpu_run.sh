# One device call: kernel tests on CUDA, two small launch sweeps, then all benchmarks.
# Usage (repo root, on a CUDA machine): OUT=/some/dir bash benchmarks/kernels/_gpu_run.sh
set -x
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels > $OUT/tests.log 2>&1; echo "tests rc=$?" | tee -a $OUT/tests.log
tail -3 $OUT/tests.log
timeout 80 python benchmarks/kernels/bench_paged_attention.py --tune > $OUT/tune.log 2>&1; echo "tune rc=$?"
timeout 60 python benchmarks/kernels/bench_attention_stats.py --tune >> $OUT/tune.log 2>&1; echo "stats tune rc=$?"
grep -E "BEST|stats max|block_n=" $OUT/tune.log
PB=$(grep '^BEST {"frac"' $OUT/tune.log | sed 's/^BEST //' | python -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ('block_n','num_warps','num_stages','programs_per_sm')}))")
SB=$(grep '^BEST {"ms"' $OUT/tune.log | sed 's/^BEST //' | python -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ('max_block_q','block_n','num_warps')}))")
echo "paged=$PB stats=$SB"
timeout 200 python benchmarks/kernels/bench_all.py --out $OUT/bench.md ${PB:+--paged-tuning "$PB"} ${SB:+--stats-tuning "$SB"} > $OUT/bench.log 2>&1; echo "bench rc=$?"
cat $OUT/bench.md
timeout 300 python benchmarks/kernels/bench_compression.py > $OUT/compression.json 2> $OUT/compression.log; echo "compression rc=$?"
cat $OUT/compression.json
timeout 120 python benchmarks/kernels/bench_reconstruction.py > $OUT/reconstruction.json 2> $OUT/reconstruction.log; echo "reconstruction rc=$?"
cat $OUT/reconstruction.json
timeout 120 python benchmarks/kernels/bench_kvzip_pass.py > $OUT/kvzip_pass.json 2> $OUT/kvzip_pass.log; echo "kvzip pass rc=$?"
cat $OUT/kvzip_pass.json
