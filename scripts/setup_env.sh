#!/usr/bin/env bash
# Sets up .venv for tofa_fast on a fresh machine: PyTorch + torchvision, then tofa_fast itself with
# its C++ extension compiled in place. Idempotent; `setup_env.sh test` also installs the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tofa_fast needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade pip setuptools wheel
# torch first, so the extension build (no build isolation) compiles against this very torch.
pip_install torch torchvision ninja numpy
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation -e ".${extras}"
