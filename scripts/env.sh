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
