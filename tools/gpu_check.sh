#!/bin/bash
# On one GPU, in under 8 minutes: bench at the paper configuration (eager, --compile, --precision bf16-mixed),
# bench --overhead, and a 300-step train of each model on a synthetic CIFAR-100 through the real data loader
# (8 workers); everything in one JSON, <out>/gpu_check.json. Usage, from the repository root:
#   bash tools/gpu_check.sh [OUT_DIR]          (default: $OUT if set, else ./gpu_check)
# Runs with python3 as found (PYTHON=... to choose); wheels in .whl/ (tools/gpu_wheels.sh; WHEELS=... elsewhere)
# are installed first.
# Every stage has its own time limit, so the JSON is written even if one fails; its "stages" say how each went.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$repo/gpu_check}}"
py="${PYTHON:-python3}"
mkdir -p "$out"
work="$(mktemp -d)"
wheels="${WHEELS:-$repo/.whl}"
if compgen -G "$wheels/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export DIFFUSIONBLOCKS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
cd "$work"
stages="$work/stages.tsv"

stage() {  # stage NAME LIMIT_S COMMAND...: run it under a time limit, log to $out/NAME.log, record rc and times
  local name="$1" limit="$2" start rc
  shift 2
  echo "gpu_check: $name ..." >&2
  start=$EPOCHREALTIME
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$start" "$EPOCHREALTIME" >> "$stages"
}

main=("$py" "$repo/main.py")
bench=(bench cifar100 --accelerator gpu --steps 20 --warmup_steps 5 --num_workers 8)
stage bench_eager 90 "${main[@]}" "${bench[@]}" --output "$work/bench_eager.json"
stage bench_compile 150 "${main[@]}" "${bench[@]}" --compile --steps 10 --output "$work/bench_compile.json"
stage bench_bf16 60 "${main[@]}" "${bench[@]}" --precision bf16-mixed --output "$work/bench_bf16.json"
stage bench_overhead 90 "${main[@]}" bench cifar100 --overhead --accelerator gpu --steps 10 --warmup_steps 3 \
  --output "$work/overhead.json"
# 12,800 synthetic training images: 300 steps of batch 128 are 3 epochs.
stage data 30 env PYTHONPATH="$repo/tests:$repo${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
  "from synthetic import write_cifar; write_cifar('$work/data', 'cifar100', n_train=12800, n_test=1000)"
train=(train cifar100 --data_dir "$work/data" --accelerator gpu --num_workers 8 --batch_size 128 --logger csv)
stage train_vit 90 "${main[@]}" "${train[@]}" --model_type vit --max_steps 300 --run_name gpu-vit
# dblock's --max_steps counts per block: 100 x B = 3 blocks is 300 optimizer steps.
stage train_dblock 90 "${main[@]}" "${train[@]}" --model_type dblock --max_steps 100 --run_name gpu-dblock

"$py" - "$work" "$out/gpu_check.json" <<'PY'
import json, sys
from pathlib import Path

work, target = Path(sys.argv[1]), Path(sys.argv[2])
def read(path):
    return json.loads(path.read_text()) if path.exists() else None
stages = {}
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, start, end = line.split("\t")
    stages[name] = {"rc": int(rc), "wall_s": float(end) - float(start)}
report = {"stages": stages, **{name: read(work / f"{name}.json") for name in
                                 ("bench_eager", "bench_compile", "bench_bf16", "overhead")}}
report["train"] = {
    model: {"optimizer_steps": 300, "wall_s": stages.get(f"train_{model}", {}).get("wall_s"),
            "metrics": read(work / "logs" / f"gpu-{model}" / "metrics.json")}
    for model in ("vit", "dblock")
}
target.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(stages, indent=2))
PY
