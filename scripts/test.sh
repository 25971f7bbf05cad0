#!/usr/bin/env bash
# Set up the test environment (a venv in .venv) and run every test layer: unit, static, host, browser.
#   bash scripts/test.sh [pytest args...]
#
# The host and browser layers need a real ComfyUI, given one of two ways:
#   COMFYUI_PATH=/path/to/ComfyUI            a checkout with its own Python (COMFYUI_PYTHON, or its .venv)
#   ATELIER_COMFYUI_SOURCE=ComfyUI.tar.gz    a ComfyUI source (tarball or folder): unpacked once into
#                                            .cache/comfyui/, its requirements installed into .venv
# Without either they are skipped with one line saying why; under CI=true that is a failure.
# The browser layer also needs Chromium (Debian's `chromium`, or ATELIER_CHROMIUM).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
source scripts/env.sh
atelier_setup_venv
atelier_setup_comfyui || { echo "error: the ComfyUI for the host layer could not be set up (see above)" >&2; exit 2; }
if [ "${CI:-}" = "true" ] && [ -z "${COMFYUI_PATH:-}" ]; then
  echo "error: CI=true, but no ComfyUI for the host layer: set ATELIER_COMFYUI_SOURCE to a ComfyUI source" \
       "tarball or COMFYUI_PATH to a checkout (.ci/run uses ../shared/comfyui/comfyui-0.15.1.tar.gz when it" \
       "exists). In CI a skipped host layer is a failure." >&2
  exit 1
fi
setup_s=$((SECONDS - started))
set +e
"$VENV/bin/python" -m pytest -c tests/pytest.ini tests "$@"
rc=$?
set -e
echo "== set-up (venv, ComfyUI): ${setup_s} s; whole run: $((SECONDS - started)) s"
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$rc"
