#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating it on first use.
#   bash launchers/env.sh COMMAND [ARGS...]
# The environment is (re)installed when pyproject.toml or constraints.txt changed since the last install.
# It is the exact tested set (constraints.txt) with DALI for CUDA 13; see README "Installing".
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
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH" DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
cd "$root"
exec "$@"
