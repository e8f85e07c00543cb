#!/usr/bin/env bash
# Set-up plus the main job on the embedded default: build the trained tiny model that ships
# inside edgepipe (recipes/tiny-trained.yaml: a small Qwen2 trained on the Python standard
# library) for the CPU profile, then let the artifact complete a piece of Python.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
.venv/bin/edgepipe build recipes/tiny-trained.yaml -p cpu-x64 -o dist
.venv/bin/edgepipe run dist/tiny-trained/cpu-x64 $'import os\n\n\ndef read_lines(path):\n    ' \
    --max-new-tokens 48 --seed 0
