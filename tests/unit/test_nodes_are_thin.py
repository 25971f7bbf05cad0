"""Thin nodes: a node's behaviour code (every method but the ``INPUT_TYPES`` schema, and every helper function
of a node module, docstrings, comments and blank lines left out) is at most ``LIMIT`` lines: the schema, one
call into a core, the wrapping of its result. (That node modules import no ComfyUI is test_layering's job.)
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (ROOT / "nodes").glob("*.py") if p.name != "__init__.py")
LIMIT = 15
SCHEMA = {"INPUT_TYPES"}


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
        elif isinstance(cls, (ast.FunctionDef, ast.AsyncFunctionDef)):  # a module-level helper
            yield cls.name, cls


def parsed(name):
    source = (ROOT / "nodes" / f"{name}.py").read_text(encoding="utf-8")
    return source, ast.parse(source)


@pytest.mark.parametrize("name", MODULES)
def test_node_behaviour_is_at_most_the_limit(name):
    source, tree = parsed(name)
    methods = dict(node_methods(tree))
    assert methods, f"nodes/{name}.py defines no node class and no function"
    long = {m: n for m, fn in methods.items() if (n := behaviour_lines(source, fn)) > LIMIT}
    assert not long, f"nodes/{name}.py: behaviour code over {LIMIT} lines: {long}; move the work into a core"


def test_the_checks_see_what_they_should():
    source = '''from ..host import models


def helper(x):
    return models.f(x)


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
    assert [(m, behaviour_lines(source, fn)) for m, fn in node_methods(tree)] == [("helper", 1), ("A.run", 4)]
