#!/bin/bash
# A cascade's stages as dependent SLURM jobs: each stage starts when the one before has finished
# well (--dependency=afterok:), and a last small job writes DIR/cascade.json.
#   bash launch/slurm/cascade.sh [SBATCH_OPTION ...] -- experiment=CASCADE [hydra.run.dir=DIR] [override ...]
# The overrides are those of python -m ssl_vit.cascade (ssl_vit/cascade.py); each stage is the
# ordinary training run that `cascade.dry_run=true` prints, submitted with the sbatch script
# $STAGE_SCRIPT (default: train_1node.sbatch beside this file) and the sbatch options given before
# `--` (e.g. --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu). Without hydra.run.dir the
# cascade goes to outputs/cascade/DATE/TIME. Prints one line per job: "stage NAME: job ID (DIR)".
# Started again with the same hydra.run.dir, it submits only the stages without final metrics;
# an unfinished stage resumes from its checkpoint.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAGE_SCRIPT=${STAGE_SCRIPT:-$HERE/train_1node.sbatch}
PYTHON=${PYTHON:-python}

SBATCH_OPTIONS=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $1 != -- ]]; do SBATCH_OPTIONS+=("$1"); shift; done
  shift
fi
OVERRIDES=("$@")
if [[ " ${OVERRIDES[*]} " != *" hydra.run.dir="* ]]; then
  OVERRIDES+=("hydra.run.dir=outputs/cascade/$(date +%Y-%m-%d/%H-%M-%S)")
fi

# The stages' commands, one per line ("python -m ssl_vit.train OVERRIDE ..."), composed and checked
# now: a typo in any stage fails here, before anything is submitted.
PLAN=$("$PYTHON" -m ssl_vit.cascade "${OVERRIDES[@]}" cascade.dry_run=true)

previous=""
while IFS= read -r line; do
  [[ -n $line ]] || continue
  eval "words=($line)"                    # the dry run quotes each word for a shell (shlex.join)
  stage_overrides=("${words[@]:3}")       # drop "PYTHON -m ssl_vit.train"
  stage_dir=""
  for arg in "${stage_overrides[@]}"; do [[ $arg == hydra.run.dir=* ]] && stage_dir=${arg#hydra.run.dir=}; done
  name=$(basename "$stage_dir")
  if [[ -f $stage_dir/metrics.json ]]; then   # written when a run ends: the stage is done
    echo "stage $name: finished earlier in $stage_dir; not submitted"
    continue
  fi
  dependency=()
  [[ -z $previous ]] || dependency=("--dependency=afterok:$previous")
  previous=$(sbatch --parsable --job-name="cascade-$name" "${dependency[@]}" "${SBATCH_OPTIONS[@]}" \
             "$STAGE_SCRIPT" "${stage_overrides[@]}")
  previous=${previous%%;*}
  echo "stage $name: job $previous ($stage_dir)"
done <<< "$PLAN"

# The cascade command itself once every stage is done: it finds them finished and writes cascade.json.
dependency=()
[[ -z $previous ]] || dependency=("--dependency=afterok:$previous")
report=$(sbatch --parsable --job-name=cascade-report "${dependency[@]}" "${SBATCH_OPTIONS[@]}" \
         --nodes=1 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
         --wrap="$(printf '%q ' "$PYTHON" -m ssl_vit.cascade "${OVERRIDES[@]}")")
echo "report: job ${report%%;*}"
