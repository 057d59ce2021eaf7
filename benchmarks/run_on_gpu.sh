#!/usr/bin/env bash
# The GPU checks of issue #29 and of the CUDA paths, as run on a lent GPU machine (CI never runs this).
# On a machine with Python, torch and CUDA but without this project's other dependencies, wheels for
# them may sit in .whl/ (pip download ... -d .whl); results go to $OUT (default: benchmarks/results).
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L
python3 -c "import torch, daskrecon, dask, distributed, deepinv; print('torch', torch.__version__, 'dask', dask.__version__, 'deepinv', deepinv.__version__, 'cuda', torch.cuda.is_available())"
# 1. the CUDA tests (tests/test_gpu.py): device placement, reduced precisions, bitwise 1/2 workers, dask-cuda
timeout "${GPU_TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rA tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
# 2. the benchmarks (every section writes its numbers to the JSON as it ends)
timeout "${GPU_BENCH_S:-300}" python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v Warning | tail -40
# 3. the dask-cuda example as users run it
timeout "${GPU_EXAMPLE_S:-90}" python3 examples/local_cuda_cluster.py 2>&1 | tee "$OUT/gpu_example.log" | tail -15
exit 0
