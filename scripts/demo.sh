#!/usr/bin/env bash
# Set-up plus the main job on the embedded default: build the random-weight tiny Qwen2
# recipe for the CPU profile, then run the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
.venv/bin/edgepipe build recipes/tiny-qwen2.yaml -p cpu-x64 -o dist
.venv/bin/edgepipe run dist/tiny-qwen2/cpu-x64 "Write a haiku about the sea." --max-new-tokens 32
