"""Static layer: what a user reads names the methods and papers, never the project's internal paper numbers.

Checked: every node's display name, description and tooltips; every workflow's file name, notes, node and group
titles; README.md, docs/, the help pages (web/docs) and the translations (locales/); the strings of the
command-line tools. None may say "seed 000" ... "seed 004" or "(seed: 5000)" (name the paper, or "the article's
value"), cite design notes that are not in the repository, or talk about how the project was made (which
machine happened to be at hand) or point at a machine path.
"""
import ast
import json
import pathlib
import re

import pytest
from test_node_schemas import NODES, PACK

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = [
    (re.compile(r"(?<![a-z])seeds? ?00\d", re.IGNORECASE), "an internal paper number: name the paper or the method"),
    (re.compile(r"\(seed: ", re.IGNORECASE), "a default given as '(seed: ...)': say '(the article's value)' or just the value"),
    (re.compile(r"\bseed (?:paper|papers|default)s?\b|\bthe seed(?:'s)? (?:setting|figures|retrieval|sampling)\b"
                r"|\bas (?:in )?the seed(?: does)?\b|\bevery seed\b", re.IGNORECASE), "'the seed' for a paper: name the paper"),
    (re.compile(r"\b(?:DESIGN|COMMON|ANCHORS)\.md\b|\bANCHORS \d"), "a design note that is not in the repository"),
    (re.compile(r"\bno GPU was lent\b|\bin this session\b|\bshared with other jobs\b|/work/|/tmp/comfy", re.IGNORECASE),
     "how the project was made, or a machine path"),
]
# the one place an old file name may appear: the alias note for a renamed workflow
ALIAS = re.compile(r"`[\w.-]+\.json` is now `[\w.-]+\.json`")
NOTE_TYPES = ("Note", "MarkdownNote")
CLI_MODULES = sorted({p for p in ROOT.glob("*/cli.py")} | {ROOT / "runner" / "run.py", ROOT / "training" / "finetune_artist.py"})


def problems(text):
    text = ALIAS.sub("", text)
    return [f"{m.group(0)!r}: {why}" for rule, why in RULES for m in rule.finditer(text)]


def node_strings(cls, display_name):
    yield "display name", display_name
    yield "DESCRIPTION", getattr(cls, "DESCRIPTION", "")
    for specs in cls.INPUT_TYPES().values():
        for name, spec in specs.items():
            if isinstance(spec, (tuple, list)) and len(spec) > 1 and isinstance(spec[1], dict):
                yield f"input {name}", spec[1].get("tooltip", "")
    for index, tip in enumerate(getattr(cls, "OUTPUT_TOOLTIPS", None) or ()):
        yield f"output {index}", tip or ""


def workflow_strings(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    yield "file name", path.name
    for node in wf["nodes"]:
        yield f"node {node['id']} title", node.get("title", "")
        if node["type"] in NOTE_TYPES:
            yield f"note {node['id']}", "\n".join(str(v) for v in node.get("widgets_values") or [])
    for group in wf.get("groups") or []:
        yield f"group {group.get('id')}", group.get("title", "")


def documents():
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "web").rglob("*.md"))]
    paths += [p for p in sorted((ROOT / "locales").glob("*/*.json")) if p.stem in ("main", "nodeDefs")]
    return paths


def cli_strings(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield f"line {node.lineno}", node.value


@pytest.mark.parametrize("node_id, cls", NODES, ids=[n for n, _ in NODES])
def test_node_strings(node_id, cls):
    bad = [f"{where}: {p}" for where, text in node_strings(cls, PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id])
           for p in problems(text)]
    assert not bad, f"{node_id}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_workflow_strings(path):
    bad = [f"{where}: {p}" for where, text in workflow_strings(path) for p in problems(text)]
    assert not bad, f"{path.name}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_document(path):
    bad = [f"line {i}: {p}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
           for p in problems(line)]
    assert not bad, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", CLI_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_line_strings(path):
    bad = [f"{where}: {p}" for where, text in cli_strings(path) for p in problems(text)]
    assert not bad, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("text, expected", [
    ("PLMS (seed 000, Algorithm 1)", 1), ("seeds 000, 001", 1), ("plms_seed000.json", 1),
    ("Weight (seed: 5000).", 1), ("every seed in one graph", 1), ("as in Atelier's seed paper", 1), ("as the seed does (50)", 1),
    ("see DESIGN.md section 4", 1), ("No GPU figures (no GPU was lent)", 1), ("default /work/comfyui", 1),
    ("Seed of the noise and of the cutouts.", 0), ("the seed is fixed so a re-run gives the same image", 0),
    ("Creative Painting with Latent Diffusion Models (arXiv 2209.14697)", 0), ("(5000, the article's value)", 0),
    ("`plms_seed000.json` is now `plms_creative_painting.json`.", 0), ("see `plms_seed000.json`", 1),
])
def test_rules(text, expected):
    assert len(problems(text)) == expected, problems(text)


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_document_links_point_into_the_repository(path):
    """A relative link names a file of the repository (docs cite only what is there)."""
    broken = [t for t in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
              if not re.match(r"[a-z]+:|#", t) and not (path.parent / t.split("#")[0]).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to files that are not in the repository: {broken}"
