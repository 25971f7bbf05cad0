# Sourced by scripts/*.sh: the one install recipe for the pack's test environment.
#
# PyTorch: torchvision from PyPI only works with the matching torch build (its compiled ops need it), and
# open_clip and spandrel need torchvision; so torch and torchvision are pinned together here. On a machine
# with no GPU these (CUDA) builds run on the CPU. requirements.txt never lists torch.
TORCH_PIN="torch==2.15.0"
TORCHVISION_PIN="torchvision==0.29.2"
VENV="${ATELIER_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

_pip() {  # pip, minus the warnings about this machine's optional local indexes
  "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

atelier_setup_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  local want_torch="${TORCH_PIN#torch==}" want_tv="${TORCHVISION_PIN#torchvision==}"
  local have
  have=$("$VENV/bin/python" -c "import torch, torchvision; print(torch.__version__.split('+')[0], torchvision.__version__.split('+')[0])" 2>/dev/null || true)
  if [ "$have" != "$want_torch $want_tv" ]; then
    echo "== installing $TORCH_PIN $TORCHVISION_PIN (once; several GB)"
    _pip install -q --disable-pip-version-check "$TORCH_PIN" "$TORCHVISION_PIN"
  fi
  echo "== installing the pack's requirements and test tools"
  _pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt "$TORCH_PIN" "$TORCHVISION_PIN"
  "$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null > "$VENV/pip-list.txt"
  "$VENV/bin/python" - <<'PY'
import importlib, sys
import torch, torchvision
from torchvision.ops import nms  # fails when torch and torchvision builds do not match
bad = []
for name in ("open_clip", "spandrel", "transformers", "safetensors", "faiss", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every broken import at once
        bad.append(f"{name}: {exc}")
print(f"== torch {torch.__version__}, torchvision {torchvision.__version__}, python {sys.version.split()[0]}")
if bad:
    sys.exit("broken test environment:\n  " + "\n  ".join(bad))
PY
}

# --------------------------------------------------------------------------------------------------
# ComfyUI for the host layer. Either a checkout with its own Python (COMFYUI_PATH, and COMFYUI_PYTHON or
# its .venv), or a ComfyUI *source* (ATELIER_COMFYUI_SOURCE: a release tarball or an unpacked folder),
# which is unpacked once into .cache/comfyui/<sha256>/ and whose requirements go into the one test venv.

_comfyui_requirements() {  # ComfyUI's requirements.txt minus torch/torchvision (pinned above) and torchaudio
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$1"
}

_torchaudio_pin() {  # torchaudio matching the pinned torch, when PyPI has one (its minor tracks torch's)
  local minor="${TORCH_PIN#torch==}"
  minor="${minor%.*}"
  if "$VENV/bin/pip" install -q --dry-run --no-deps --disable-pip-version-check "torchaudio==$minor.*" \
      >/dev/null 2>&1; then
    echo "torchaudio==$minor.*"
  fi
}

atelier_install_comfyui_requirements() {  # $1: ComfyUI's requirements.txt; skipped when already installed
  local req="$1" stamp key
  key=$( { cat "$req"; echo "$TORCH_PIN $TORCHVISION_PIN"; } | sha256sum | cut -c1-16)
  stamp="$VENV/.comfyui-requirements-$key"
  if [ -f "$stamp" ]; then
    return 0
  fi
  local audio
  audio=$(_torchaudio_pin)
  echo "== installing ComfyUI's requirements into $VENV (${audio:-without torchaudio: no build matches $TORCH_PIN})"
  _pip install -q --disable-pip-version-check -r <(_comfyui_requirements "$req") $audio \
    "$TORCH_PIN" "$TORCHVISION_PIN" || return 1
  "$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null > "$VENV/pip-list.txt"
  touch "$stamp"
}

atelier_setup_comfyui() {  # exports COMFYUI_PATH (and COMFYUI_PYTHON for a source); 0 also when none is given
  if [ -n "${COMFYUI_PATH:-}" ]; then
    [ -n "${ATELIER_COMFYUI_SOURCE:-}" ] && echo "== COMFYUI_PATH is set: using that checkout, not $ATELIER_COMFYUI_SOURCE"
    echo "== host layer: ComfyUI checkout $COMFYUI_PATH"
    return 0
  fi
  [ -n "${ATELIER_COMFYUI_SOURCE:-}" ] || return 0
  local tree
  tree=$("$VENV/bin/python" scripts/comfyui_source.py "$ATELIER_COMFYUI_SOURCE") || return 2
  atelier_install_comfyui_requirements "$tree/requirements.txt" || return 1
  export COMFYUI_PATH="$tree" COMFYUI_PYTHON="$VENV/bin/python"
  echo "== host layer: ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$tree/comfyui_version.py") from $ATELIER_COMFYUI_SOURCE"
}
