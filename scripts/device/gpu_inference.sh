#!/usr/bin/env bash
# Run ON the GPU machine (device tool), from the repository root, after the parts that
# prepare_gpu_inference.sh made are in /tmp/exo-parts (see scripts/device/README.md).
# Joins and installs them, points MLX's CUDA build at the machine's CUDA 13 libraries,
# imports the bundled model and runs scripts/device/gpu_inference.py. Output also goes to
# $OUT/gpu_inference.log and $OUT/gpu_inference.json.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
cat /tmp/exo-parts/part-* > /tmp/exo-bundle.tar && tar -xf /tmp/exo-bundle.tar -C /tmp || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site /tmp/bundle/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
# mlx-cuda-13 looks for CUDA's libraries beside itself; here they come with PyTorch.
nvidia=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$(find "$nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export EXO_HOME=/tmp/exo-home
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import mlx.core as mx; print("mlx", mx.default_device(), mx.cuda.is_available())'
    python3 scripts/device/gpu_inference.py --model /tmp/bundle/*.gguf \
        --json "$out/gpu_inference.json"
} 2>&1 | tee "$out/gpu_inference.log"
