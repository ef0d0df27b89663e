#!/usr/bin/env bash
# examples/paper/reproduce.sh on a Slurm cluster: every stage is one job (or a job array, one task per
# model or per model pair), submitted at once with `--dependency=afterok:...` so each starts when the
# stages it reads have finished. The jobs run reproduce.sh OUTDIR STAGE ITEM: the same stage
# definitions, settings and resume rules as a run on one machine.
#
#   LT_PROFILE=paper LT_DATA=cifar100:$HOME/data examples/paper/slurm.sh OUTDIR
#   LT_SBATCH="--partition=gpu --gpus=1 --time=24:00:00" examples/paper/slurm.sh OUTDIR
#
# Jobs:  train      array 0-3: dnn dnn_smoothing mcdo mcdo_smoothing
#        evaluate   array 0-1: pairs dnn mcdo        after train
#        hessian    array 0-1                        after train
#        surface    one job (the MC-dropout pair)    after train
#        featvar    array 0-1                        after train
#        robustness array 0-1                        after train
#        compare    array 0-1                        after evaluate, hessian, surface, featvar
#        report     one job                          after compare, robustness
# A job that fails cancels nothing by itself, but the jobs that depend on it never start (afterok);
# submit again after fixing the cause: finished stage items are skipped, interrupted analyses resume.
#
# Environment: LT_PROFILE, LT_DATA, LT_DEVICE, LT_SEED, LT, LT_PYTHON as for reproduce.sh (sbatch passes
# your environment to the jobs); LT_SBATCH: extra sbatch options for every job (use the --opt=value
# form); SBATCH: the sbatch command (default sbatch).
set -euo pipefail

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
[[ $# -eq 1 && $1 != -h && $1 != --help ]] || { usage; [[ $# -eq 1 ]] && exit 0 || exit 2; }
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPRODUCE=${LT_REPRODUCE:-$HERE/reproduce.sh}
SBATCH=${SBATCH:-sbatch}
read -r -a EXTRA <<< "${LT_SBATCH:-}"

mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)     # jobs may start in another folder

# submit NAME DEPENDENCIES ARRAY ITEMS...: one job (ARRAY empty) or an array whose task i runs item i;
# prints the job id
submit() {
  local name=$1 deps=$2 items=("${@:4}") array=$3 opts=()
  [[ -n $deps ]] && opts+=("--dependency=afterok:$deps")
  local run
  if [[ -n $array ]]; then
    opts+=("--array=$array")
    run="items=(${items[*]}); exec \"$REPRODUCE\" \"$OUT\" $name \"\${items[\$SLURM_ARRAY_TASK_ID]}\""
  else
    run="exec \"$REPRODUCE\" \"$OUT\" $name ${items[*]}"
  fi
  "$SBATCH" --parsable --job-name="lt-paper-$name" --output="$OUT/logs/$name-%A_%a.log" "${opts[@]}" "${EXTRA[@]}" \
    --wrap="$run" | tail -n 1 | cut -d';' -f1
}

train=$(submit train "" 0-3 dnn dnn_smoothing mcdo mcdo_smoothing)
evaluate=$(submit evaluate "$train" 0-1 dnn mcdo)
hessian=$(submit hessian "$train" 0-1 dnn mcdo)
surface=$(submit surface "$train" "" mcdo)
featvar=$(submit featvar "$train" 0-1 dnn mcdo)
robustness=$(submit robustness "$train" 0-1 dnn mcdo)
compare=$(submit compare "$evaluate:$hessian:$surface:$featvar" 0-1 dnn mcdo)
report=$(submit report "$compare:$robustness" "")
echo "submitted: train $train, evaluate $evaluate, hessian $hessian, surface $surface, featvar $featvar," \
     "robustness $robustness, compare $compare, report $report; logs in $OUT/logs/, report: $OUT/report.md"
