#!/bin/bash
# Run here (with a network), once, from the repository root: the wheels tools/gpu_check.sh needs on the device
# machine, whose python3 has torch, Lightning, transformers, torchvision, huggingface_hub, safetensors, scikit-learn
# and matplotlib but not the CLI parser. They land in .whl/ (ignored by git, carried by the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
# jsonargparse[signatures] and its needs, and setuptools (inductor imports it to build C++ kernels), at the versions
# uv.lock pins.
wheels=()
for name in jsonargparse docstring-parser typeshed-client setuptools; do
  wheels+=("$name==$(uv run --locked python -c "import importlib.metadata as m; print(m.version('$name'))")")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
ls -l .whl
