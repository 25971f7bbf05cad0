"""Thin nodes: a node module imports no ComfyUI (the host seam does), and a node's behaviour code (every method
but the ``INPUT_TYPES`` schema, docstrings, comments and blank lines left out) is at most ``LIMIT`` lines: the
schema, one call into a core, the wrapping of its result.

``MODULES`` lists the node modules held to it (the prompt extension, artist and upscale nodes); a module that
is reshaped the same way joins the list.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = ["prompt_ext", "artist", "upscale"]
LIMIT = 15
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "node_helpers",
           "server", "latent_preview", "execution", "comfyui_version"}
SCHEMA = {"INPUT_TYPES"}


def comfy_imports(tree):
    """(line, module) of every import of ComfyUI in a module, in functions too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in COMFYUI]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in COMFYUI:
            found.append((node.lineno, node.module))
    return found


def behaviour_lines(source, function):
    """Source lines of a function's body that are code: no docstring, comment or blank line."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    lines = source.splitlines()[body[0].lineno - 1:body[-1].end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def node_methods(tree):
    """(class.method, function node) of the classes the module registers in NODE_CLASS_MAPPINGS."""
    registered = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "NODE_CLASS_MAPPINGS" for t in node.targets):
            registered |= {v.id for v in node.value.values if isinstance(v, ast.Name)}
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and cls.name in registered:
            for fn in cls.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name not in SCHEMA:
                    yield f"{cls.name}.{fn.name}", fn


def parsed(name):
    source = (ROOT / "nodes" / f"{name}.py").read_text(encoding="utf-8")
    return source, ast.parse(source)


@pytest.mark.parametrize("name", MODULES)
def test_node_module_imports_no_comfyui(name):
    _, tree = parsed(name)
    assert comfy_imports(tree) == [], f"nodes/{name}.py imports ComfyUI itself; go through host/"


@pytest.mark.parametrize("name", MODULES)
def test_node_behaviour_is_at_most_the_limit(name):
    source, tree = parsed(name)
    methods = dict(node_methods(tree))
    assert methods, f"nodes/{name}.py registers no node class"
    long = {m: n for m, fn in methods.items() if (n := behaviour_lines(source, fn)) > LIMIT}
    assert not long, f"nodes/{name}.py: behaviour code over {LIMIT} lines: {long}; move the work into a core"


def test_the_checks_see_what_they_should():
    source = '''import comfy.utils
from folder_paths import x
from ..host import models


class A:
    @classmethod
    def INPUT_TYPES(cls):
        return {}

    def run(self, a):
        """Docstring."""
        # a comment

        b = a + 1
        return (
            b,
        )


NODE_CLASS_MAPPINGS = {"A": A}
'''
    tree = ast.parse(source)
    assert comfy_imports(tree) == [(1, "comfy.utils"), (2, "folder_paths")]
    assert [(m, behaviour_lines(source, fn)) for m, fn in node_methods(tree)] == [("A.run", 4)]
