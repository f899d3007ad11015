#!/usr/bin/env bash
# Run on the GPU machine (device tool), from the repository root, with .whl carried:
#   bash scripts/device/gpu_check.sh
# Installs the carried wheels, then runs the tests marked `gpu` against real NVML and the
# telemetry benchmark on the CUDA backend. Output also goes to $OUT/gpu_check.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
log="${OUT:-/tmp}/gpu_check.log"
{
    nvidia-smi --query-gpu=name,memory.total,temperature.gpu,clocks.max.sm,clocks.max.mem --format=csv
    python3 -m pytest -p no:cacheprovider -m gpu -v -s src/exo/gpu
    python3 -c "
import anyio
from exo.gpu.backend import GPUBackendFactory
from exo.shared.types.ids import NodeId
async def main():
    backend = await GPUBackendFactory.create_backend('cuda')
    for info in await backend.list_devices(NodeId('check')):
        print(info.model_dump_json(indent=1))
        print((await backend.sample(NodeId('check'), info.device_id)).model_dump_json(indent=1))
    await backend.shutdown()
anyio.run(main)
"
    python3 bench/telemetry.py --backend cuda --duration 21
} 2>&1 | tee "$log"
