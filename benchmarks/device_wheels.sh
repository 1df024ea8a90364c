#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels the serving stack needs on a GPU machine
# without network (python 3.12, x86-64): the server (fastapi, uvicorn, pydantic) and
# structured outputs (llguidance). On the GPU machine, `source benchmarks/device_env.sh` installs
# them into /tmp/site. Usage: bash benchmarks/device_wheels.sh [DIR]   (default .whl)
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  fastapi starlette pydantic pydantic-core uvicorn annotated-types typing-inspection \
  typing-extensions opentelemetry-api llguidance
ls "$dir"
