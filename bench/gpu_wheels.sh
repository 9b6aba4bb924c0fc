#!/usr/bin/env bash
# Wheels of the server's packages that the lent GPU machine's image lacks (Python 3.12, x86-64), into .whl/
# (git-ignored), for `bench/gpu.sh` there. The device call then names `.whl` in carry and begins with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing_extensions
    opentelemetry-api sniffio)
pins=()
for name in "${packages[@]}"; do  # the versions installed here, which the tests pass with
    pins+=("$name==$(python3 -m pip show "$name" | sed -n 's/^Version: //p')")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls .whl
