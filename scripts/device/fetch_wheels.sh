#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks for the NVML checks (its image has
# Python 3.12, pytest, hypothesis, anyio, psutil and nvidia-ml-py, not pydantic or loguru).
# They go to .whl/ in the repository root, which git is told to ignore.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
versions=$(uv pip list 2>/dev/null | awk '$1 ~ /^(pydantic|pydantic-core|annotated-types|typing-inspection|loguru)$/ {print $1"=="$2}')
for requirement in $versions; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$requirement"
done
ls -1 .whl
