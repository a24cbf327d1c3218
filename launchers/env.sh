#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating it on first use.
#   bash launchers/env.sh COMMAND [ARGS...]
# The environment is (re)installed when pyproject.toml or constraints.txt changed since the last install.
# It is the exact tested set (constraints.txt) with DALI for CUDA 13; see docs/install.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ZOOME_VENV:-$root/.venv}"
stamp="$venv/.zoome-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing zoome_dist and its pinned stack into $venv (first run: a few minutes)" >&2
  # DS_BUILD_OPS=0: DeepSpeed compiles nothing at install time (docs/stack.md).
  DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test,dali-cu13]" -c "$root/constraints.txt" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$venv/bin/python" -c "import zoome_dist, torch, nvidia.dali, deepspeed, ray" >/dev/null 2>&1 \
    || { echo "[env] install failed" >&2; exit 1; }
fi
export PATH="$venv/bin:$PATH" DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
# DeepSpeed's JIT-built ops (on CPU: the shared-memory collective every rank loads) live in the venv, so
# two installs never rebuild them for each other; on CPU it is built here, once, not by the first run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ "$DS_ACCELERATOR" = cpu ]; then
    echo "[env] building DeepSpeed's CPU shared-memory op with g++ (once per install, about a minute)" >&2
    "$venv/bin/python" -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" \
      >/dev/null 2>&1 || echo "[env] warning: the op did not build (needs g++); DeepSpeed builds it on first use" >&2
  fi
  echo "$want" > "$stamp"
fi
cd "$root"
exec "$@"
