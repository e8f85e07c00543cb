#!/usr/bin/env bash
# Set-up plus the full test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# pytest exits 5 when it collected no test: that is a failure here too (set -e).
.venv/bin/python -m pytest "$@"
