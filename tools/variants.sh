#!/bin/bash
# The training levers (docs/variants.md), each switched on alone, against the released default and the paper's
# normalised bridge, on the digits task and budget of docs/independent-blocks.md (joint DiffusionBlocks training,
# 60 x 3 epochs). Usage: [PREFIX=name] [EPOCHS=60] [VARIANTS="default mse ..."] bash tools/variants.sh [SEED...]
# (seeds 1 2 by default). Run folders: logs/<PREFIX>-<variant>-s<seed>; the report table: logs/<PREFIX>-table.md;
# with `main.py diagnose` available, each run's diagnostics/ folder too, and docs/variants.md's table of them:
# logs/<PREFIX>-diagnose-table.md.
set -euo pipefail
if [ "$#" -eq 0 ]; then set -- 1 2; fi
seeds=("$@")
epochs="${EPOCHS:-60}"
prefix="${PREFIX:-variants}"
# The values, and why (docs/variants.md says the same):
#   smooth  0.1:   the usual label-smoothing value for image classifiers.
#   clamp   35:    the EDM weight at sigma = 0.18, the boundary between blocks 1 and 2 (equiprob, B = 3): only the
#                  lowest-noise block's samples are capped, at the largest weight block 1 trains with (the
#                  uncapped weight reaches 250,000 at sigma = 0.002).
#   ema     0.999: an average over about 1,000 updates (half-life 693), an eighth of the 7,200 steps.
declare -A lever=(
  [default]=""
  [normalised-bridge]="--raw_embedding_bridge false"
  [mse]="--loss mse"
  [brier]="--loss brier"
  [smooth]="--label_smoothing 0.1"
  [clamp]="--max_loss_weight 35"
  [ema]="--ema_decay 0.999"
  [tied]="--weight_tied"
)
read -r -a variants <<< "${VARIANTS:-default normalised-bridge mse brier smooth clamp ema tied}"
for variant in "${variants[@]}"; do
  [ -v "lever[$variant]" ] || { echo "unknown variant $variant: choose from ${!lever[*]}" >&2; exit 2; }
done
# Digits must not be mirrored (--augment none); one thread per process is fastest for this size on a CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
common=(digits --model_type dblock --patch_size 4 --hidden_size 64
        --num_hidden_layers 6 --num_attention_heads 4 --intermediate_size 128 --batch_size 32 --num_workers 0
        --augment none --lr 1e-3 --eval_every_n_epochs 20 --logger csv --num_epochs "$epochs")
diagnose=false
if uv run main.py diagnose --help > /dev/null 2>&1; then diagnose=true; fi
runs=()
for seed in "${seeds[@]}"; do
  for variant in "${variants[@]}"; do
    run="$prefix-$variant-s$seed"
    # shellcheck disable=SC2086 (a variant's flags are several words)
    uv run main.py train "${common[@]}" ${lever[$variant]} --seed "$seed" --run_name "$run"
    if $diagnose; then
      uv run main.py diagnose digits --ckpt_path "logs/$run/last.ckpt" --num_workers 0 --batch_size 250
    fi
    runs+=("logs/$run")
  done
done
uv run main.py report "${runs[@]}" --output "logs/$prefix-table.md"
if $diagnose; then  # docs/variants.md's table: the final test and the diagnose figures of every run
  uv run python tools/variants_table.py "$prefix" "${runs[@]}" | tee "logs/$prefix-diagnose-table.md"
fi
