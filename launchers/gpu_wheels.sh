#!/usr/bin/env bash
# The wheels an offline GPU host with its own torch needs to run this package (docs/install.md,
# "GPU check"): DeepSpeed built with no ops, WebDataset, and their small dependencies, for that host's
# Python (default 3.12, the GPU check host's). About 5 MB; built here, carried there.
#   bash launchers/gpu_wheels.sh [DIR=.whl] [PYTHON_VERSION=3.12]
# There: pip install --no-deps --no-index --target /tmp/site DIR/*.whl; PYTHONPATH=/tmp/site bash launchers/gpu_check.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py="${2:-3.12}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
mkdir -p "$dir"
# versions: constraints.txt's where it pins them, else those of the tested environment (docs/stack.md)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -c constraints.txt -w "$dir" deepspeed webdataset
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$py" \
    --platform manylinux2014_x86_64 -d "$dir" braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
ls -l "$dir"
