#!/bin/bash
# Cross-validation under SLURM: one array task per (variant, fold) job, then the report once every task
# has ended (afterany: the report step trains whatever a failed task left, then writes OUT/table.md).
# Edit the lines marked "edit" (and the #SBATCH lines of cv.sbatch), then, from the checkout's folder:
#   bash launchers/slurm/cv.sh
# Rerunning it resumes: finished jobs are not retrained, interrupted ones continue from their checkpoint.
CONFIG=${CONFIG-launchers/configs/zoome.yaml}    # edit (empty: the built-in paper recipe)
SHARDS=${SHARDS:-/shared/isic/shards}            # edit: shared storage (every task's node reads it)
FOLDS=${FOLDS:-0-9}                              # edit
VARIANTS=${VARIANTS:-}                           # edit: e.g. zoome,zoome_no_meta (empty: the config's)
OUT=${OUT:-/shared/runs/cv}                      # edit: on storage every node mounts
VENV=${VENV:-}                                   # edit: an environment to activate (empty: zoome on PATH)
EXTRA=${EXTRA:-}                                 # more `zoome cv` flags, e.g. "--set train.epochs=30"
SBATCH_ARGS=${SBATCH_ARGS:-}                     # more sbatch flags for both steps, e.g. "--partition=gpu"

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "$VENV" ]; then source "$VENV/bin/activate"; fi
export CONFIG SHARDS FOLDS VARIANTS OUT VENV EXTRA
dry=(zoome cv --shards "$SHARDS" --folds "$FOLDS" --out "$OUT" --dry-run $EXTRA)
if [ -n "$CONFIG" ]; then dry+=(--config "$CONFIG"); fi
if [ -n "$VARIANTS" ]; then dry+=(--variants "$VARIANTS"); fi
n=$("${dry[@]}" | grep -c '^job ')
array=$(sbatch --parsable --array=0-$((n - 1)) --export=ALL $SBATCH_ARGS "$here/cv.sbatch")
report=$(sbatch --parsable --dependency=afterany:$array --export=ALL,ZOOME_STEP=report --job-name=zoome-cv-report \
    $SBATCH_ARGS "$here/cv.sbatch")
echo "submitted: $n training task(s) as array job $array, the report as job $report (after the array)"
echo "array=$array report=$report"
