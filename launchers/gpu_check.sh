#!/usr/bin/env bash
# The one-GPU check (issue 14): the `gpu`-marked tests, the Triton Zoom-SE against the fused one on
# this GPU (logits, gradients: the evidence `model.zoom_se_impl: auto` waits for), then side by side in
# one run ZooME (fused and Triton Zoom-SE) vs ResNeXt50 training img/s, host operations per step, CUDA
# graphs (train.cuda_graphs) at micro 8, the nvJPEG (and DALI, where it imports) input pipeline vs decode only,
# a 3-epoch 1-GPU DeepSpeed training on 1024 px synthetic data, `zoome predict` TTA 1 vs 8, 8-GPU data
# parallelism at global batch 64 projected from the micro-8 step and an all-reduce of the gradients (measured
# over the local GPUs where there are several), and last torch.compile'd ZooME (fused, Triton) vs ResNeXt50.
# Writes gpu_check.json and gpu_check.md into OUT_DIR (after every part). 2.5 minutes on an H200 before the
# torch.compile part (up to four compiles, 300 s budget) was added; the aim is under 8 minutes.
#
#   bash launchers/gpu_check.sh [OUT_DIR [--only PART,...] [--no-compile] [--no-tests]]   (default OUT_DIR: runs/gpu_check)
#
# On a GPU host with its own torch and no network, bring DeepSpeed and WebDataset as wheels
# (docs/install.md, "GPU check") and put them on PYTHONPATH first; DALI is optional.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $python (torch.cuda.is_available() is False, or torch is missing); nothing to check" >&2
  exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
out="${1:-$root/runs/gpu_check}"
shift $(( $# > 0 ? 1 : 0 ))
exec "$python" "$root/launchers/benchmark.py" gpu --out "$out" "$@"   # e.g. --no-compile, --only compiled
