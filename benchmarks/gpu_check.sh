#!/usr/bin/env bash
# Everything issues 8 and 13 ask of a GPU, in one command (a lent GPU machine is billed by the
# minute): the aggregator tests on CUDA (the CPU-vs-CUDA equality tests and the compiled Triton
# kernels), the timings in reads with the kernels' launch settings, then, when Flower is
# importable, the task tests on CUDA and a resnet18 federated round (10 clients training on
# shares of the GPU, robust aggregation of 11.2M parameters on it).
#
#   bash benchmarks/gpu_check.sh OUT_DIR      # writes OUT_DIR/pytest.log, gpu.md, gpu_reads.log,
#                                             # tasks.log, resnet18_round.md/.json,
#                                             # server_round.md/.json (issue 17's round on CUDA)
#
# Flower, flwr-datasets and dp-accounting are not on the lent machine's image: carry them as
# wheels made here by `bash benchmarks/gpu_wheels.sh` (its header gives the device command).
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
federated=0
if python3 -c "import flwr, flwr_datasets, dp_accounting" 2>/dev/null; then
    python3 -m pytest -q -p no:cacheprovider tests/test_tasks.py tests/test_model_dtypes.py 2>&1 | tee "$out/tasks.log"
    federated=${PIPESTATUS[0]}
    python3 benchmarks/task_round.py --task resnet18 --clients 10 --rounds 2 --amp \
        --json "$out/resnet18_round.json" 2>&1 | tee "$out/resnet18_round.md"
    federated=$(( federated != 0 || ${PIPESTATUS[0]} != 0 ))
    # The server round at model scale with the stack on the GPU (Flower's strategies stay on CPU):
    # benchmarks/round.py, as docs/benchmarks.md "The server round at model scale" ran it on CPU.
    python3 benchmarks/round.py --device cuda --n 20,100 --d 1M,11.2M --repeats 2 \
        --markdown "$out/server_round.md" --json "$out/server_round.json" 2>&1 | tail -n 40
    federated=$(( federated != 0 || ${PIPESTATUS[0]} != 0 ))
else
    echo "Flower is not importable: skipped the task tests, the resnet18 round and the server round (see benchmarks/gpu_wheels.sh)"
fi
echo "pytest exit $tests, gpu_reads exit $bench, federated exit $federated"
exit $(( tests != 0 || bench != 0 || federated != 0 ))
