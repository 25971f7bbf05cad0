"""Static layer: every example workflow explains itself to a user who opens it.

A Note names the model files the workflow needs (and README's gallery row does too), titled groups box
the stages without cutting through a node (the frontend moves a node with a group when the node's centre
lies inside it, so a member must lie wholly inside), and a same-name .jpg thumbnail exists for the
template browser (written by the browser test with ATELIER_WRITE_THUMBNAILS=1).
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
IDS = [p.name for p in WORKFLOWS]
NOTE_TYPES = ("Note", "MarkdownNote")
NODE_TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
MODEL_FILE = re.compile(r"[\w.\-]+\.(?:safetensors|ckpt|pth|pt|bin|gguf|onnx|sqlite)\b")
STYLE_DB = re.compile(r"([\w.\-]+)/manifest\.json\b")
THUMB_MAX_BYTES = 80_000


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def note_text(wf):
    return "\n".join(str(v) for n in wf["nodes"] if n["type"] in NOTE_TYPES for v in n.get("widgets_values") or [])


def model_files(wf):
    """Model files (and style databases, by folder) that the widgets of the non-note nodes name."""
    names = set()
    for n in wf["nodes"]:
        if n["type"] in NOTE_TYPES:
            continue
        for value in n.get("widgets_values") or []:
            if isinstance(value, str):
                names.update(MODEL_FILE.findall(value))
                names.update(STYLE_DB.findall(value))
    return names


def readme_row(name):
    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith(f"| `{name}`")]
    return rows[0] if len(rows) == 1 else None


def node_rect(n):
    (x, y), (w, h) = n["pos"][:2], n["size"][:2]
    return x, y - NODE_TITLE_HEIGHT, x + w, y + h


def inside(r, box):
    return box[0] <= r[0] and box[1] <= r[1] and r[2] <= box[2] and r[3] <= box[3]


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_model_file_pattern_finds_files_in_labels():
    """The checks below only mean something if the pattern finds names inside combo labels."""
    wf = {"nodes": [{"type": "AtelierArtistLoader", "widgets_values": ["Claude Monet — claude_monet.safetensors", 1.0]},
                    {"type": "AtelierStyleDBLoad", "widgets_values": ["wikiart_vit_l14/manifest.json"]},
                    {"type": "SaveImage", "widgets_values": ["atelier/txt2img"]},
                    {"type": "Note", "widgets_values": ["mentions other.pth"]}]}
    assert model_files(wf) == {"claude_monet.safetensors", "wikiart_vit_l14"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_has_a_note(path):
    assert note_text(load(path)).strip(), f"{path.name}: add a Note node that explains the settings and files"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_model_files_listed_in_note_and_readme(path):
    wf = load(path)
    notes, row = note_text(wf), readme_row(path.name)
    assert row is not None, f"README.md: the workflow gallery needs exactly one row for `{path.name}`"
    for name in sorted(model_files(wf)):
        assert name in notes, f"{path.name}: the Note does not name {name}, which a widget of the workflow uses"
        assert name in row, f"README.md: the gallery row of {path.name} does not name {name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_groups_box_their_nodes(path):
    wf = load(path)
    groups = wf.get("groups") or []
    assert groups, f"{path.name}: no groups; box the stages (Model, Prompt, Sampling, Output ...)"
    boxes = []
    for g in groups:
        x, y, w, h = g["bounding"]
        assert g.get("title", "").strip(), f"{path.name}: group {g.get('id')} has no title"
        assert w > 0 and h > 0, f"{path.name}: group {g['title']!r} has an empty box"
        boxes.append((g["title"], (x, y, x + w, y + h)))
    for i, (title, box) in enumerate(boxes):
        for other, box2 in boxes[i + 1:]:
            assert not overlap(box, box2), f"{path.name}: groups {title!r} and {other!r} overlap"
        members = 0
        for n in wf["nodes"]:
            r = node_rect(n)
            centre = ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2) * 2
            if inside(centre, box):
                members += 1
                assert inside(r, box), f"{path.name}: node {n['id']} ({n['type']}) sticks out of group {title!r}"
            elif n["type"] not in NOTE_TYPES:
                assert not overlap(r, box), f"{path.name}: group {title!r} cuts through node {n['id']} ({n['type']})"
        assert members, f"{path.name}: group {title!r} holds no node"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_thumbnail_for_template_browser(path):
    """ComfyUI's template browser shows workflows/<name>.jpg next to <name>.json."""
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), (f"{thumb.name} missing: run the browser test with ATELIER_WRITE_THUMBNAILS=1 "
                             f"(tests/host/test_browser.py -k {path.stem})")
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"
    assert len(data) < THUMB_MAX_BYTES, f"{thumb.name} is {len(data)} bytes; keep thumbnails under {THUMB_MAX_BYTES}"
    image = pytest.importorskip("PIL.Image").open(thumb)
    assert 256 <= image.width <= 1024 and image.height >= 64, f"{thumb.name} is {image.size}; expected ~512 px wide"
