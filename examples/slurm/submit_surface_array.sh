#!/bin/bash
# Submit the surface array (surface_array.sbatch: one `--shard slurm` task per array index) and a merge
# job that runs only when every task succeeded (afterok): `lt merge` joins the shards into OUT.h5.
#
#   LT_MODEL=smooth.pt LT_DATA=cifar100:data examples/slurm/submit_surface_array.sh
#
# Environment: as surface_array.sbatch, plus LT_OUT (MODEL.surface.h5) and LT_ARRAY (0-15: the tasks).
# If a task fails, the merge job never starts; rerun the failed task (sbatch --array=<k> ...) and then
# the merge (the `lt merge` line below) by hand.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${LT_MODEL:-smooth.pt}
STEM=$(basename "${MODEL%.*}")
OUT=${LT_OUT:-$STEM.surface.h5}

jid=$(sbatch --parsable --array="${LT_ARRAY:-0-15}" "$HERE/surface_array.sbatch")
jid=${jid%%;*}
sbatch --parsable --dependency="afterok:$jid" --job-name=lt-surface-merge --ntasks=1 \
    --wrap "lt merge $STEM.surface.shard*of*.h5 -o $OUT --plot ${OUT%.h5}.png"
