#!/usr/bin/env bash
# Everything issue 8 asks of a GPU, in one command (a lent GPU machine is billed by the minute):
# the aggregator tests on CUDA (the CPU-vs-CUDA equality tests and the compiled Triton kernels),
# then the timings in reads with the kernels' launch settings.
#
#   bash benchmarks/gpu_check.sh OUT_DIR      # writes OUT_DIR/pytest.log, gpu.md, gpu_reads.log
#
# Without a GPU, `python benchmarks/triton_resources.py` at least compiles the kernels for sm_90
# and reports registers and spills.
#
# Needs python3 with torch (CUDA), triton, numpy, threadpoolctl, pytest and hypothesis; Flower is
# not needed (the aggregator tests and benchmarks/gpu_reads.py do not import it). Copy gpu.md to
# docs/gpu.md when the numbers are to be kept.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_aggregators_*.py 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu_reads.py --sweep --out "$out/gpu.md" 2>&1 | tee "$out/gpu_reads.log"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, gpu_reads exit $bench"
exit $(( tests != 0 || bench != 0 ))
