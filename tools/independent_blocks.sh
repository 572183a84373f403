#!/bin/bash
# Joint DiffusionBlocks training against blocks trained as independent jobs, on scikit-learn's digits
# (see docs/independent-blocks.md). Usage: bash tools/independent_blocks.sh DATA_DIR [SEED...]
# Every block gets the same number of updates in both modes: joint trains EPOCHS x B epochs drawing one
# block per step, each independent job trains EPOCHS epochs of its own block.
set -euo pipefail
data="${1:?usage: tools/independent_blocks.sh DATA_DIR [SEED...]}"
shift
seeds=("${@:-1}")
epochs="${EPOCHS:-30}"
common=(imagefolder --data_dir "$data" --model_type dblock --image_size 16 --patch_size 4 --hidden_size 64
        --num_hidden_layers 6 --num_attention_heads 4 --intermediate_size 128 --batch_size 64 --num_workers 0
        --logger csv --num_epochs "$epochs" ${EXTRA:-})
test_flags=(--data_dir "$data" --num_workers 0 --batch_size 250)
runs=()
for seed in "${seeds[@]}"; do
  uv run main.py train "${common[@]}" --seed "$seed" --run_name "indep-joint-s$seed"
  for block in 0 1 2; do
    uv run main.py train "${common[@]}" --seed "$seed" --train_blocks "$block" --run_name "indep-b$block-s$seed"
  done
  mkdir -p "logs/indep-assembled-s$seed"
  uv run main.py assemble logs/indep-b{0,1,2}-s"$seed"/last.ckpt --output "logs/indep-assembled-s$seed/model.ckpt"
  uv run main.py test imagefolder --ckpt_path "logs/indep-assembled-s$seed/model.ckpt" "${test_flags[@]}"
  runs+=("logs/indep-joint-s$seed" "logs/indep-assembled-s$seed")
done
uv run main.py report "${runs[@]}"
