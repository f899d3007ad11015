#!/usr/bin/env bash
# Run HERE (not on the GPU machine): gather what gpu_inference.sh needs there and cut it
# into parts of at most 58 MiB, one per device call (a call carries 64 MiB at most, the
# working tree included). The GPU machine has Python 3.12, PyTorch, transformers,
# tokenizers, nvidia-ml-py and CUDA 13's libraries; it lacks MLX (mlx-cuda-13 is 86 MiB),
# mlx-lm, pydantic and loguru, and the bundled model (94 MiB). See scripts/device/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/bundle/wheels
locked() { uv pip list 2>/dev/null | awk -v name="$1" '$1 == name {print $1"=="$2}'; }
requirements=(
    "mlx==0.32.4" "mlx-cuda-13==0.32.4"
    "$(locked mlx-lm)" "$(locked pydantic)" "$(locked pydantic-core)"
    "$(locked annotated-types)" "$(locked typing-inspection)" "$(locked loguru)"
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/bundle/wheels "${requirements[@]}"
gguf=$(uv run python -c 'from exo.models.bundled import bundled_gguf_path; print(bundled_gguf_path())')
cp "$gguf" .device/bundle/
tar -cf .device/bundle.tar -C .device bundle
split -b 58m -d .device/bundle.tar .device/part-
rm -rf .device/bundle .device/bundle.tar
count=0
for part in .device/part-*; do
    count=$((count + 1))
    mkdir -p ".device/call-$count"
    mv "$part" ".device/call-$count/"
done
echo "$count device calls, back to back (the machine goes back after 30 s idle):"
for index in $(seq 1 "$count"); do
    if [ "$index" -lt "$count" ]; then
        echo "  run carry=[\".device/call-$index\"] command='mkdir -p /tmp/exo-parts && cp .device/call-$index/* /tmp/exo-parts/'"
    else
        echo "  run carry=[\".device/call-$index\"] timeout_s=540 command='mkdir -p /tmp/exo-parts && cp .device/call-$index/* /tmp/exo-parts/ && bash scripts/device/gpu_inference.sh'"
    fi
done
