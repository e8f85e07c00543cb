#!/usr/bin/env bash
# Set-up plus the full test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# tests/test_avx2.py runs an int4 artifact under `qemu-x86_64 -cpu Haswell` (an AVX2-only CPU).
# Install Debian's qemu-user when it is missing and we are root; in CI (CI=true) a missing
# qemu is a failure, not a skip.
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user
    fi
    if ! command -v qemu-x86_64 >/dev/null 2>&1; then
        echo "qemu-x86_64 not found: install qemu-user (apt-get install qemu-user)" >&2
        if [ "${CI:-}" = true ]; then exit 1; fi
    fi
fi
# pytest exits 5 when it collected no test: that is a failure here too (set -e).
.venv/bin/python -m pytest "$@"
