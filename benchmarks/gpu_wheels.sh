#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for the federated part of benchmarks/gpu_check.sh.
#
# The device image has PyTorch, Triton, NumPy, SciPy, scikit-learn, pandas, pyarrow, grpcio,
# protobuf, rich, typer, httpx... but not Flower, flwr-datasets, datasets or dp-accounting.
# This downloads them (and the few of their needs the image lacks) for its Python 3.12 into
# .whl/, which `.git/info/exclude` must ignore and the device call must `carry`:
#
#   echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu_wheels.sh
#   device run: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#               && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_check.sh $OUT
#
# Only the in-process engine is used there (no Ray), so ray and uv are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    flwr==1.42.0 flwr-datasets==0.6.1 "datasets>=4,<5" dp-accounting==0.6.0 dm-tree \
    cryptography pycryptodome iterators tomli tomli-w sqlalchemy alembic mako prompt-toolkit \
    grpcio-health-checking dill multiprocess threadpoolctl
du -sh .whl
