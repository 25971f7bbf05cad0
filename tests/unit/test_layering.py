"""Layering: ComfyUI is imported only by the host seam (``host/``); the cores never import it, nor the nodes.

See docs/architecture.md."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PURE = ["samplers", "prompt_ext", "retrieval", "upscale", "training", "common", "runner", "metrics", "nodes", "rdm"]
ALLOWED = set()
FORBIDDEN = {
    "comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
    "node_helpers", "server", "latent_preview", "execution", "comfyui_version",
}


def forbidden_imports(source, filename="<src>"):
    """Top-level module names of forbidden imports in a source text, with line numbers."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN:
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.split(".")[0] in FORBIDDEN:
                found.append((node.lineno, module))
            elif node.level >= 2 and module.split(".")[0] == "nodes":
                found.append((node.lineno, "." * node.level + module))
    return found


def pure_files():
    for package in PURE:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel not in ALLOWED:
                yield rel
    yield pathlib.Path("atelier.py")
    yield pathlib.Path("__init__.py")


@pytest.mark.parametrize("rel", list(pure_files()), ids=str)
def test_pure_module_imports_no_comfyui(rel):
    bad = forbidden_imports((ROOT / rel).read_text(encoding="utf-8"), str(rel))
    assert not bad, f"{rel} imports ComfyUI: " + ", ".join(f"line {n}: {m}" for n, m in bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import folder_paths", ["folder_paths"]),
        ("from comfy.samplers import KSampler", ["comfy.samplers"]),
        ("import comfy.model_management as mm", ["comfy.model_management"]),
        ("from ..nodes import x", ["..nodes"]),
        ("def f():\n    import server", ["server"]),
        ("import torch\nfrom .plms import sample_plms", []),
        ("from comfyish import x", []),
    ],
)
def test_layering_detector(source, expected):
    assert [m for _, m in forbidden_imports(source)] == expected
