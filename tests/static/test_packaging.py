"""Static layer: the pack's packaging metadata, as ComfyUI, ComfyUI-Manager and the Comfy Registry read it."""
import pathlib
import re

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
NEVER = {"torch", "torchvision", "torchaudio"}
# What ComfyUI 0.15.1's requirements.txt already installs: a pack must not list (or pin) these again.
COMFYUI_PROVIDES = {"numpy", "safetensors", "transformers", "tokenizers", "sentencepiece", "spandrel", "pillow",
                    "tqdm", "scipy", "einops", "torchsde", "aiohttp", "yarl", "pyyaml", "psutil", "kornia",
                    "alembic", "sqlalchemy", "av", "pydantic", "pydantic-settings", "requests"}


def names(lines):
    """Normalised distribution names of requirement lines (PEP 503: lower case, '_' and '.' -> '-')."""
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]).lower())
    return out


def requirement_lines():
    return (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def normalise(line):
    return re.sub(r"\s+", "", line.split("#", 1)[0]).lower().replace("_", "-")


def test_requirements_and_pyproject_dependencies_agree():
    reqs = sorted(normalise(line) for line in requirement_lines() if normalise(line))
    deps = sorted(normalise(line) for line in pyproject()["project"]["dependencies"])
    assert reqs == deps, "requirements.txt and pyproject.toml [project].dependencies differ"


@pytest.mark.parametrize("source", ["requirements.txt", "pyproject.toml"])
def test_no_torch_and_nothing_comfyui_already_requires(source):
    listed = names(requirement_lines()) if source == "requirements.txt" else names(pyproject()["project"]["dependencies"])
    assert not NEVER & set(listed), f"{source} lists torch/torchvision/torchaudio"
    assert not COMFYUI_PROVIDES & set(listed), f"{source} lists what ComfyUI already requires"


def test_pyproject_has_registry_fields():
    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,99}", project["name"])
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"] and project["requires-python"]
    assert project["urls"]["Repository"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)


def test_names_helper_normalises():
    assert names(["Open_Clip.Torch>=2", "# x", "faiss-cpu ; python_version>'3'", "-r other.txt", "torch"]) == [
        "open-clip-torch", "faiss-cpu", "torch"]
