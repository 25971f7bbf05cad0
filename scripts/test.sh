#!/usr/bin/env bash
# Set up the test environment (a venv in .venv) and run every test layer.
#   bash scripts/test.sh [pytest args...]
# Host tests run only when a ComfyUI checkout is found (COMFYUI_PATH, or the ComfyUI this pack sits in);
# otherwise they are skipped with one line saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
atelier_setup_venv
set +e
"$VENV/bin/python" -m pytest -c tests/pytest.ini tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$rc"
