"""The sampling nodes are thin: no ComfyUI import (they reach ComfyUI through ``host/``), and the method each
node runs (its FUNCTION) is at most 15 lines of behaviour code, one call into ``samplers/`` plus wrapping.
What users read of the sampling area (node texts, docs, workflow notes) names the papers, not seed numbers."""
import ast
import json
import pathlib
import re

import pytest

from test_layering import forbidden_imports

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLING_NODES = ["nodes/plms.py", "nodes/multistage.py", "nodes/clip_guidance.py"]
MAX_LINES = 15


def node_methods(tree):
    """(class, method, behaviour lines) of each class's FUNCTION method (its own or a base's in the module);
    the docstring is not behaviour."""
    functions = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        own = [s.value.value for s in cls.body if isinstance(s, ast.Assign)
               and any(getattr(t, "id", "") == "FUNCTION" for t in s.targets)]
        inherited = [functions[b.id] for b in cls.bases if isinstance(b, ast.Name) and b.id in functions]
        functions[cls.name] = function = (own + inherited + [None])[0]
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == function:
                body = item.body[1:] if ast.get_docstring(item) else item.body
                yield cls.name, item.name, body[-1].end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("rel", SAMPLING_NODES)
def test_sampling_nodes_import_no_comfyui(rel):
    assert forbidden_imports((ROOT / rel).read_text(encoding="utf-8"), rel) == []


@pytest.mark.parametrize("rel", SAMPLING_NODES)
def test_node_methods_are_short(rel):
    found = list(node_methods(ast.parse((ROOT / rel).read_text(encoding="utf-8"))))
    assert found, f"{rel}: no node method found"
    long = [(cls, name, n) for cls, name, n in found if n > MAX_LINES]
    assert not long, f"{rel}: node methods over {MAX_LINES} lines: {long}"


def test_the_line_counter_counts():
    tree = ast.parse("class N:\n    FUNCTION = 'run'\n    def run(self):\n        '''doc'''\n" + "        x = 1\n" * 16)
    assert list(node_methods(tree)) == [("N", "run", 16)]


# ------------------------------------------------------------------ what users read names papers, not seeds
WORDS = re.compile(r"\bseeds? 0\d\d|\(seed: |seed's|DESIGN\.md|COMMON\.md|ANCHORS", re.IGNORECASE)
DOCS = ["docs/plms.md", "docs/multistage.md", "docs/clip_guidance.md"]
WORKFLOWS = ["plms_creative_painting.json", "multistage_dragon_fish.json", "multistage_sweep.json",
             "clip_guided_swinir.json", "clip_guided_style.json"]


def node_texts(cls):
    yield cls.DESCRIPTION
    yield from cls.OUTPUT_TOOLTIPS
    for group in cls.INPUT_TYPES().values():
        for _, (_, opts) in group.items():
            yield opts.get("tooltip", "")


def test_node_texts_name_no_seed_numbers(pack):
    from atelier.nodes import clip_guidance, multistage, plms

    for module in (plms, multistage, clip_guidance):
        for node_id, cls in module.NODE_CLASS_MAPPINGS.items():
            bad = [text for text in node_texts(cls) if WORDS.search(text)]
            assert not bad, f"{node_id}: {bad}"


@pytest.mark.parametrize("rel", DOCS + [f"workflows/{name}" for name in WORKFLOWS])
def test_docs_and_workflow_notes_name_no_seed_numbers(rel):
    text = (ROOT / rel).read_text(encoding="utf-8")
    if rel.endswith(".json"):
        workflow = json.loads(text)
        text = "\n".join([str(n.get("title", "")) for n in workflow["nodes"]] +
                         [v for n in workflow["nodes"] for v in n.get("widgets_values") or [] if isinstance(v, str)])
    assert not WORDS.findall(text), f"{rel}: {sorted(set(WORDS.findall(text)))}"


def test_the_words_check_catches_what_it_should():
    assert [bool(WORDS.search(t)) for t in ("PLMS (seed 000)", "seeds 002 + 004", "(seed: 5000)", "the seed's",
                                            "plms_seed000.json", "the seed of the noise")] == [
        True, True, True, True, False, False]
