#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels benchmarks/gpu_checks.sh installs on a GPU host that cannot reach
# PyPI: Python 3.12, x86-64 Linux. The lent hosts carry JAX 0.11.2 (CUDA 13), under which this project's pinned
# flax 0.12.8 does not import and 0.12.10 does; they lack grain (array_record, portpicker), ml_collections and
# tensorboardX, which `dvl_jax.data` / `dvl_jax.training` import (benchmarks/accelerator.py imports both), and
# fastapi / uvicorn / pydantic / opentelemetry-api for `dvl serve`. Checked against a stand-in of the host's
# Python (3.12, jax 0.11.2, transformers 5.17, the host's package list; no GPU): every phase's imports resolve.
# Usage: benchmarks/gpu_wheels.sh [PACKAGE==VERSION ...]   (default: the list below)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=("$@")
[[ ${#wheels[@]} -gt 0 ]] || wheels=(flax==0.12.10 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
  ml_collections==1.1.0 tensorboardX==2.6.5 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4
  pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 opentelemetry-api==1.45.2
  uvicorn==0.55.0 sniffio==1.3.1)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
grep -qxF '/.whl/' .git/info/exclude 2> /dev/null || echo '/.whl/' >> .git/info/exclude
ls -l .whl
