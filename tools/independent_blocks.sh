#!/bin/bash
# Joint DiffusionBlocks training against blocks trained as independent jobs, on scikit-learn's digits
# (see docs/independent-blocks.md). Usage: [PREFIX=name] [EXTRA="train flags"] bash tools/independent_blocks.sh [SEED...]
# Run folders: logs/<PREFIX>-joint-s<seed>, logs/<PREFIX>-b<block>-s<seed>, logs/<PREFIX>-assembled-s<seed>.
# Every block gets the same number of updates in both modes: joint trains EPOCHS x B epochs drawing one
# block per step, each independent job trains EPOCHS epochs of its own block.
set -euo pipefail
seeds=("${@:-1}")
epochs="${EPOCHS:-60}"
prefix="${PREFIX:-indep}"
# Digits must not be mirrored (--augment none); one thread per process is fastest for this size on a CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
common=(digits --model_type dblock --patch_size 4 --hidden_size 64
        --num_hidden_layers 6 --num_attention_heads 4 --intermediate_size 128 --batch_size 32 --num_workers 0
        --augment none --lr 1e-3 --eval_every_n_epochs 20 --logger csv --num_epochs "$epochs" ${EXTRA:-})
test_flags=(--num_workers 0 --batch_size 250)
runs=()
for seed in "${seeds[@]}"; do
  uv run main.py train "${common[@]}" --seed "$seed" --run_name "$prefix-joint-s$seed"
  for block in 0 1 2; do
    uv run main.py train "${common[@]}" --seed "$seed" --train_blocks "$block" --run_name "$prefix-b$block-s$seed"
  done
  mkdir -p "logs/$prefix-assembled-s$seed"
  uv run main.py assemble logs/"$prefix"-b{0,1,2}-s"$seed"/last.ckpt --output "logs/$prefix-assembled-s$seed/model.ckpt"
  uv run main.py test digits --ckpt_path "logs/$prefix-assembled-s$seed/model.ckpt" "${test_flags[@]}"
  runs+=("logs/$prefix-joint-s$seed" "logs/$prefix-assembled-s$seed")
done
uv run main.py report "${runs[@]}"
