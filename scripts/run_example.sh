#!/usr/bin/env bash
# Main job: run an example workflow headless through a real ComfyUI and print where the images went.
#   bash scripts/run_example.sh [workflow.json] [runner options: --tiny, --set NODE.input=VALUE, --timeout S ...]
# ComfyUI: $COMFYUI_PATH, or the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<this pack>).
# Its Python: $COMFYUI_PYTHON, or <ComfyUI>/.venv or venv, or python3. The runner installs the pack's
# requirements.txt into that Python when something is missing. `python -m runner --help` lists the options.
set -euo pipefail
cd "$(dirname "$0")/.."
workflow="workflows/txt2img_core.json"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  workflow="$1"
  shift
fi
comfy="${COMFYUI_PATH:-}"
if [ -z "$comfy" ] && [ "$(basename "$(dirname "$PWD")")" = "custom_nodes" ] && [ -f "../../main.py" ]; then
  comfy="$(cd ../.. && pwd)"
fi
python="${COMFYUI_PYTHON:-}"
if [ -z "$python" ] && [ -n "$comfy" ]; then
  for candidate in "$comfy/.venv/bin/python" "$comfy/venv/bin/python"; do
    if [ -x "$candidate" ]; then python="$candidate"; break; fi
  done
fi
python="${python:-$(command -v python3 || command -v python)}"
args=("$workflow")
if [ -n "$comfy" ]; then args+=(--comfyui "$comfy" --python "$python"); fi
exec "$python" -m runner "${args[@]}" "$@"
