#!/usr/bin/env bash
# The evidence of Park & Kim (2022), "Blurs Behave Like Ensembles", reproduced end to end with `lt`:
# four ResNet-18s (deterministic / MC dropout, each with and without spatial smoothing) trained with
# the paper's settings, then ensemble-size curves and reliability diagrams, per-batch Hessian spectra,
# 2-D loss surfaces, feature-map variance and Fourier pictures, robustness under corruption, `lt compare`
# verdicts, and OUTDIR/report.md with our numbers beside the published ones and every figure.
#
#   examples/paper/reproduce.sh OUTDIR                   # every stage, in order
#   examples/paper/reproduce.sh OUTDIR STAGE [ITEM]      # one stage (ITEM: one model of `train`, one pair
#                                                        # of the analyses; what examples/paper/slurm.sh runs)
#   LT_PROFILE=tiny examples/paper/reproduce.sh OUT      # the same pipeline on the built-in digits, CPU, minutes
#
# Stages: train evaluate hessian surface featvar robustness compare report  (`list` prints them).
# Models (OUTDIR/models/LABEL.pt): dnn dnn_smoothing mcdo mcdo_smoothing = resnet_LABEL_18.
# Pairs (one result file each, groups LABEL and LABEL_smoothing): dnn mcdo; surfaces: mcdo only.
#
# Environment:
#   LT_PROFILE  paper (default): ResNet-18 width 64, SGD lr 0.1 momentum 0.9 weight decay 5e-4, batch 128,
#               200 epochs, one warm-up epoch, x0.2 at epochs 60/120/160, flips + translations of 4;
#               every test image, every training batch, the paper's grids.
#               tiny: every stage at small sizes on `digits` (minutes on 2 CPU cores; numbers not meaningful)
#   LT_DATA     data spec of training and analyses (paper: cifar100:$HOME/data; tiny: digits), e.g. cifar10:DIR
#   LT_DEVICE   auto (default), cpu, cuda, cuda:N       LT_SEED   0 (every random choice)
#   LT          the lt command (default: lt)            LT_PYTHON python with landscape_tools (the report stage;
#                                                                 default: that of `lt`, else python3)
#
# Resuming: a stage item whose output exists is skipped, and the analyses continue from their
# OUT.h5.partial files, so after a kill, running the same command again continues where it stopped
# (training restarts the model it was training). OUTDIR/profile.txt pins the profile, its settings, the data and seed:
# another setting into the same OUTDIR is refused.
set -euo pipefail

usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "reproduce.sh: error: $*" >&2; exit 2; }

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { usage; [[ $# -ge 1 ]] && exit 0 || exit 2; }
OUT=$1
STAGE=${2:-all}
ITEM=${3:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STAGES=(train evaluate hessian surface featvar robustness compare report)
MODELS=(dnn dnn_smoothing mcdo mcdo_smoothing)
PAIRS=(dnn mcdo)

PROFILE=${LT_PROFILE:-paper}
LT=${LT:-lt}
# the report stage's Python: LT_PYTHON, else the interpreter of the `lt` script on PATH, else python3
default_python() {
  local path line
  path=$(command -v lt 2>/dev/null) && line=$(head -n 1 "$path" 2>/dev/null) && line=${line#\#!} \
    && [[ $line != *" "* && -x $line ]] && { echo "$line"; return; }
  echo python3
}
PY=${LT_PYTHON:-$(default_python)}
DEVICE=${LT_DEVICE:-auto}
SEED=${LT_SEED:-0}

case $PROFILE in
  paper)
    DATA=${LT_DATA:-cifar100:$HOME/data}
    TRAIN=(--width 64 --epochs 200 --batch-size 128 --lr 0.1 --momentum 0.9 --weight-decay 5e-4
           --warmup-epochs 1 --schedule step --milestones 60,120,160 --gamma 0.2 --flip --translate 4)
    MC=1,2,3,4,5,10,20,50
    EVALUATE=(--samples all --batch-size 256)
    HESSIAN=(--batch-size 128 --batches all --top-k 5 --tol 1e-3)
    GRID=-1:1:21; REF_GRID=-0.1:0.1:21
    SURFACE=(--samples all --batch-size 256)
    FEATVAR_MC=50
    FEATVAR=(--samples all --batch-size 64)
    ROBUST=(--mc 1,2,5,10,20,50 --samples all --batch-size 256)
    ;;
  tiny)
    DATA=${LT_DATA:-digits}
    TRAIN=(--width 4 --epochs 3 --batch-size 32 --samples 384 --lr 0.05 --momentum 0.9 --weight-decay 5e-4
           --warmup-epochs 1 --schedule step --milestones 2 --gamma 0.2 --translate 2)
    MC=1,2,3,4,5,10,20,50
    EVALUATE=(--samples 64 --batch-size 64)
    HESSIAN=(--batch-size 16 --batches 2 --top-k 5 --tol 1e-2 --max-iter 60)
    GRID=-1:1:5; REF_GRID=-0.1:0.1:5
    SURFACE=(--samples 32 --batch-size 32)
    FEATVAR_MC=4
    FEATVAR=(--samples 32 --batch-size 16)
    ROBUST=(--mc 1,2,5 --samples 32 --batch-size 32)
    # width-4 models gain nothing from more threads, and extra threads spin against other jobs
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ;;
  *) die "LT_PROFILE=$PROFILE: expected paper or tiny" ;;
esac
COMMON=(--device "$DEVICE" --seed "$SEED")

# ----------------------------------------------------------------------------- helpers
say() { echo "== $*" >&2; }

# the profile, data and seed of OUTDIR, fixed by the first run
pin_profile() {
  mkdir -p "$OUT"
  # the settings' fingerprint: an edited profile does not mix with outputs of the old one
  local sum; sum=$(echo "${TRAIN[*]} $MC ${EVALUATE[*]} ${HESSIAN[*]} $GRID $REF_GRID ${SURFACE[*]} $FEATVAR_MC \
    ${FEATVAR[*]} ${ROBUST[*]}" | cksum | cut -d' ' -f1)
  local want="profile=$PROFILE data=$DATA seed=$SEED settings=$sum"
  if [[ -f $OUT/profile.txt ]]; then
    local have; have=$(cat "$OUT/profile.txt")
    [[ $have == "$want" ]] \
      || die "$OUT was made with '$have', not '$want': use the same LT_PROFILE, LT_DATA and LT_SEED, or another OUTDIR"
  else
    # atomically: the tasks of a Slurm array may start together
    echo "$want" > "$OUT/.profile.txt.$$" && mv "$OUT/.profile.txt.$$" "$OUT/profile.txt"
  fi
}

# step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (a finished step); lt writes OUTPUT atomically
step() {
  local output=$1; shift
  if [[ -e $output ]]; then
    echo "   done already: $output" >&2
    return 0
  fi
  mkdir -p "$(dirname "$output")"
  echo "   $*" >&2
  "$@"
}

# items of a stage: every model / pair, or the one named by ITEM (checked by check_item before any stage runs)
items() {
  local -n all=$1
  if [[ -z $ITEM ]]; then echo "${all[@]}"; else echo "$ITEM"; fi
}

check_item() {
  [[ -z $ITEM ]] && return 0
  local valid
  case $STAGE in
    train) valid=("${MODELS[@]}") ;;
    surface) valid=(mcdo) ;;
    report) die "stage report takes no item (got '$ITEM')" ;;
    all) die "an ITEM needs a STAGE (got 'all $ITEM')" ;;
    *) valid=("${PAIRS[@]}") ;;
  esac
  local x
  for x in "${valid[@]}"; do [[ $x == "$ITEM" ]] && return 0; done
  die "stage $STAGE has no item '$ITEM': expected one of ${valid[*]}"
}

# a loop, not `printf | grep -q`: under pipefail, grep exiting at its first match can leave printf
# killed by SIGPIPE, and the pipeline then fails for a stage that exists (seen once under load)
known_stage() {
  local s
  for s in "${STAGES[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

ckpt() { echo "$OUT/models/$1.pt"; }
# $LT is a command line (e.g. "python -m landscape_tools.cli.main"): split on spaces
run_lt() { $LT "$@"; }

# ----------------------------------------------------------------------------- stages
stage_train() {
  local m
  for m in $(items MODELS); do
    step "$(ckpt "$m")" run_lt train "resnet_${m}_18" --data "$DATA" "${TRAIN[@]}" "${COMMON[@]}" -o "$(ckpt "$m")"
  done
}

need_models() {
  local p
  for p in "$@"; do
    [[ -f $(ckpt "$p") && -f $(ckpt "${p}_smoothing") ]] \
      || die "stage $STAGE needs $(ckpt "$p") and $(ckpt "${p}_smoothing"): run the train stage first"
  done
}

stage_evaluate() {
  local p
  for p in $(items PAIRS); do
    need_models "$p"
    step "$OUT/evaluate/$p.h5" run_lt evaluate "$(ckpt "$p")" "$(ckpt "${p}_smoothing")" --data "$DATA" --mc "$MC" \
      "${EVALUATE[@]}" "${COMMON[@]}" -o "$OUT/evaluate/$p.h5"
  done
}

stage_hessian() {
  local p
  for p in $(items PAIRS); do
    need_models "$p"
    # one Hessian per training batch; MC-dropout models at one fixed, seeded dropout mask per batch
    step "$OUT/hessian/$p.h5" run_lt hessian "$(ckpt "$p")" "$(ckpt "${p}_smoothing")" --data "$DATA" --split train \
      --scope batch --which LM "${HESSIAN[@]}" "${COMMON[@]}" -o "$OUT/hessian/$p.h5"
  done
}

stage_surface() {
  local p=mcdo     # the MC-dropout pair only
  need_models "$p"
  # one MC-dropout sample per grid point, BatchNorm on the centre's running statistics
  step "$OUT/surface/$p.h5" run_lt surface "$(ckpt "$p")" "$(ckpt "${p}_smoothing")" --data "$DATA" --split train \
    --x "$GRID" --y "$GRID" --norm filter --mc 1 "${SURFACE[@]}" "${COMMON[@]}" -o "$OUT/surface/$p.h5"
  # the reference code's slice: [-0.1, 0.1]^2, directions normalised over dim 0
  step "$OUT/surface/${p}_ref.h5" run_lt surface "$(ckpt "$p")" "$(ckpt "${p}_smoothing")" --data "$DATA" \
    --split train --x "$REF_GRID" --y "$REF_GRID" --norm filter-dim0 --mc 1 "${SURFACE[@]}" "${COMMON[@]}" \
    -o "$OUT/surface/${p}_ref.h5"
}

stage_featvar() {
  local p over
  for p in $(items PAIRS); do
    need_models "$p"
    # MC variance across dropout samples for the MC-dropout pair; the deterministic pair has no
    # randomness, so its file holds the spatial variance; both with the Fourier picture per stage
    if [[ $p == mcdo ]]; then over=(--over mc --mc "$FEATVAR_MC" --source dropout); else over=(--over spatial); fi
    step "$OUT/featvar/$p.h5" run_lt featvar "$(ckpt "$p")" "$(ckpt "${p}_smoothing")" --data "$DATA" --split test \
      "${over[@]}" --layers stages --fourier "${FEATVAR[@]}" "${COMMON[@]}" -o "$OUT/featvar/$p.h5"
  done
}

stage_robustness() {
  local p
  for p in $(items PAIRS); do
    need_models "$p"
    step "$OUT/robustness/$p.h5" run_lt evaluate "$(ckpt "$p")" "$(ckpt "${p}_smoothing")" --data "$DATA" \
      --corrupt all "${ROBUST[@]}" "${COMMON[@]}" -o "$OUT/robustness/$p.h5"
  done
}

stage_compare() {
  local p files
  for p in $(items PAIRS); do
    files=("$OUT/evaluate/$p.h5" "$OUT/hessian/$p.h5")
    # MC variance only (the deterministic pair's file is spatial variance); surfaces of the MC pair
    [[ $p == mcdo ]] && files+=("$OUT/featvar/$p.h5" "$OUT/surface/$p.h5")
    local f
    for f in "${files[@]}"; do [[ -f $f ]] || die "stage compare needs $f: run its stage first"; done
    step "$OUT/compare/$p.h5" run_lt compare "${files[@]}" --seed "$SEED" -o "$OUT/compare/$p.h5"
  done
}

stage_report() {
  "$PY" "$HERE/report.py" "$OUT" --profile "$PROFILE" --data "$DATA" --published "$HERE/published.csv"
}

run_stage() {
  local s=$1 start ms
  say "stage $s${ITEM:+ ($ITEM)} [profile $PROFILE, data $DATA]"
  start=$(date +%s%N)
  "stage_$s"
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  # wall seconds of every run of a stage (the report sums them per stage)
  printf '%s\t%s\t%d.%03d\n' "$s" "${ITEM:-all}" $((ms / 1000)) $((ms % 1000)) >> "$OUT/stage_seconds.tsv"
}

# ----------------------------------------------------------------------------- main
case $STAGE in
  list) printf '%s\n' "${STAGES[@]}"; exit 0 ;;
  all) ;;
  *) known_stage "$STAGE" || die "unknown stage '$STAGE': expected all or one of ${STAGES[*]}" ;;
esac
check_item
pin_profile
if [[ $STAGE == all ]]; then
  for s in "${STAGES[@]}"; do run_stage "$s"; done
  say "done: $OUT/report.md"
else
  run_stage "$STAGE"
fi
