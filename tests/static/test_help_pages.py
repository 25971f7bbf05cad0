"""Static layer: every node has its in-app help page, in English and Chinese, true to the node.

ComfyUI serves the pack's ``WEB_DIRECTORY`` at ``/extensions/<pack folder>/``; the frontend's help panel (node
library, selection toolbox "info") fetches ``docs/<node id>/<locale>.md``, then ``docs/<node id>.md``. So
``web/docs/<node id>.md`` is the English page and ``web/docs/<node id>/zh.md`` the Chinese one. The help panel
opens links in a new tab without rewriting them, so a page links with absolute addresses only.
"""
import ast
import json
import pathlib
import re

import pytest
from test_node_schemas import NODES, PACK

ROOT = pathlib.Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
DOCS = WEB / "docs"
ZH = json.loads((ROOT / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
WORKFLOWS = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "workflows").glob("*.json"))}
PAPERS = (
    "Creative Painting with Latent Diffusion Models",
    "Novel Paintings from the Latent Diffusion Model through Transfer Learning",
    "Text-Guided Synthesis of Artistic Images with Retrieval-Augmented Diffusion Models",
    "Multistage guidance on the diffusion model inspired by human artists' creative thinking",
    "Generate Stunning Artworks with CLIP Guided Diffusion",
)
SECTIONS = {  # what each section heading is called on the English and on the Chinese page
    "en": {"inputs": "Inputs", "outputs": "Outputs", "example": "Example workflow", "paper": "Paper"},
    "zh": {"inputs": "输入", "outputs": "输出", "example": "示例工作流", "paper": "论文"},
}
ROW = re.compile(r"^\| `([^`]+)`(?:（([^）]+)）)? \|")
LINK = re.compile(r"\]\(([^)\s]+)")
WORKFLOW_NAME = re.compile(r"`([\w.-]+\.json)`")


def pages():
    for node_id, cls in NODES:
        yield pytest.param(node_id, cls, "en", DOCS / f"{node_id}.md", id=f"{node_id}-en")
        yield pytest.param(node_id, cls, "zh", DOCS / node_id / "zh.md", id=f"{node_id}-zh")


def sections(text):
    """{heading: body} of the ``## `` sections, plus the first line under key "#"."""
    found, current = {"#": text.splitlines()[0] if text else ""}, None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return {k: v if isinstance(v, str) else "\n".join(v) for k, v in found.items()}


def table_names(body):
    """[(name, label or None)] of the rows of a section's table."""
    return [m.groups() for m in map(ROW.match, body.splitlines()) if m]


def node_inputs(cls):
    types = cls.INPUT_TYPES()
    return [name for section in ("required", "optional") for name in (types.get(section) or {})]


def node_outputs(cls):
    return list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)


def test_web_directory_is_the_docs_folder_and_holds_no_script():
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "WEB_DIRECTORY" for t in node.targets)]
    assert values == ["./web"], "__init__.py must set WEB_DIRECTORY = \"./web\" (ComfyUI serves it for the help panel)"
    scripts = sorted(str(p.relative_to(ROOT)) for p in WEB.rglob("*.js"))
    assert not scripts, f"ComfyUI loads every .js under WEB_DIRECTORY into the page: {scripts}"


def test_no_page_for_a_node_that_does_not_exist():
    node_ids = {node_id for node_id, _ in NODES}
    named = {p.stem for p in DOCS.glob("*.md")} | {p.name for p in DOCS.iterdir() if p.is_dir()}
    assert named <= node_ids, f"pages for unknown nodes: {sorted(named - node_ids)}"
    stray = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*") if p.is_file()
             and not (p.parent == DOCS and p.suffix == ".md") and not (p.parent.parent == DOCS and p.name == "zh.md")]
    assert not stray, f"files the help panel never reads: {stray}"


@pytest.mark.parametrize("node_id, cls, lang, path", list(pages()))
def test_page_is_true_to_the_node(node_id, cls, lang, path):
    assert path.is_file(), f"{path.relative_to(ROOT)} missing: every node has an English and a Chinese help page"
    text = path.read_text(encoding="utf-8")
    found = sections(text)
    names = SECTIONS[lang]
    title = PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id] if lang == "en" else ZH[node_id]["display_name"]
    assert found["#"] == f"# {title}", f"{path.name}: the page starts with '# {title}' (the node's display name)"
    for key in ("inputs", "outputs", "example", "paper"):
        assert names[key] in found, f"{path.relative_to(ROOT)}: no '## {names[key]}' section"
    inputs, outputs = table_names(found[names["inputs"]]), table_names(found[names["outputs"]])
    assert [n for n, _ in inputs] == node_inputs(cls), (
        f"{path.relative_to(ROOT)}: the inputs table must list the node's inputs in their order: {node_inputs(cls)}")
    assert [n for n, _ in outputs] == node_outputs(cls), (
        f"{path.relative_to(ROOT)}: the outputs table must list the node's outputs in their order: {node_outputs(cls)}")
    if lang == "zh":  # a label in brackets is what the Chinese UI shows for that input or output
        for name, label in inputs:
            assert label in (None, ZH[node_id]["inputs"][name]["name"]), f"{path.name}: {name} is shown as " \
                f"{ZH[node_id]['inputs'][name]['name']!r} in locales/zh, not {label!r}"
        for index, (name, label) in enumerate(outputs):
            assert label in (None, ZH[node_id]["outputs"][str(index)].get("name")), f"{path.name}: output {name}"
    assert any(title in found[names["paper"]] for title in PAPERS), (
        f"{path.relative_to(ROOT)}: the paper section names none of the papers the pack implements")


@pytest.mark.parametrize("node_id, cls, lang, path", list(pages()))
def test_page_names_real_workflows_and_working_links(node_id, cls, lang, path):
    text = path.read_text(encoding="utf-8")
    named = set(WORKFLOW_NAME.findall(sections(text)[SECTIONS[lang]["example"]]))
    assert named <= set(WORKFLOWS), f"{path.name}: no such workflow: {sorted(named - set(WORKFLOWS))}"
    using = {name for name, wf in WORKFLOWS.items() if any(n["type"] == node_id for n in wf["nodes"])}
    if using:
        assert named & using, f"{path.relative_to(ROOT)}: name one of the workflows that use the node: {sorted(using)}"
    repository = re.search(r'Repository = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8")).group(1)
    for target in LINK.findall(text):
        assert re.match(r"https?://", target), f"{path.name}: relative link {target!r} (the help panel cannot follow it)"
        if target.startswith(repository + "/blob/main/"):
            rel = target[len(repository + "/blob/main/"):].split("#")[0]
            assert (ROOT / rel).exists(), f"{path.name}: links to {rel}, which is not in the repository"


def test_section_parser_on_a_hand_made_page():
    page = "# T\n\nx\n\n## Inputs\n\n| input | what |\n| --- | --- |\n| `a` | one |\n| `b`（乙） | two |\n\n## Paper\n\np\n"
    found = sections(page)
    assert found["#"] == "# T" and table_names(found["Inputs"]) == [("a", None), ("b", "乙")]
    assert found["Paper"].strip() == "p"
