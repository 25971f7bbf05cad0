"""Static layer: every ``workflows/*.json`` is a UI-format workflow that this pack + core ComfyUI can run.

Node schemas come from the pack's own INPUT_TYPES and, for core nodes, from the committed snapshot
``core_object_info.json`` (ComfyUI 0.15.1; regenerate with update_core_snapshot.py). The widget/link
checks are runner/convert.py's, so the static layer and the headless runner agree on what is valid.
"""
import copy
import json
import pathlib

import pytest

from atelier.runner import convert

from test_node_schemas import PACK, SNAPSHOT

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# Sampler names the pack adds to ComfyUI's sampler lists when it loads (nodes/plms.py adds plms).
PACK_SAMPLERS = ("plms",)
MODES = {0, 1, 2, 3, 4}


def object_info():
    info = copy.deepcopy(json.loads(SNAPSHOT.read_text(encoding="utf-8"))["nodes"])
    for spec_name in ("KSampler", "KSamplerAdvanced", "KSamplerSelect"):
        for specs in info.get(spec_name, {}).get("input", {}).values():
            spec = specs.get("sampler_name")
            if spec is None:
                continue
            options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # V1 list or V3 COMBO
            options += [s for s in PACK_SAMPLERS if s not in options]
    for node_id, cls in PACK.NODE_CLASS_MAPPINGS.items():
        info[node_id] = convert.node_info_from_class(node_id, cls)
    return info


INFO = object_info()


def structure_problems(wf):
    """What the frontend would choke on: the UI-format skeleton and link bookkeeping."""
    problems = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            problems.append(f"top-level key '{key}' missing")
    if problems:
        return problems
    nodes = {}
    for n in wf["nodes"]:
        where = f"node {n.get('id')} ({n.get('type')})"
        for key, kind in (("id", int), ("type", str), ("pos", list), ("size", list), ("mode", int),
                          ("inputs", list), ("outputs", list), ("properties", dict)):
            if not isinstance(n.get(key), kind):
                problems.append(f"{where}: '{key}' missing or not a {kind.__name__}")
        if n.get("mode") not in MODES:
            problems.append(f"{where}: mode {n.get('mode')!r} is not one of {sorted(MODES)}")
        if n.get("id") in nodes:
            problems.append(f"{where}: duplicate node id")
        nodes[n.get("id")] = n
    link_ids = set()
    for link in wf["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(f"link {link!r}: expected [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        link_id, src, src_slot, dst, dst_slot, type_ = link
        link_ids.add(link_id)
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: joins missing node {src if src not in nodes else dst}")
            continue
        outs, ins = nodes[src]["outputs"], nodes[dst]["inputs"]
        if not 0 <= src_slot < len(outs) or link_id not in (outs[src_slot].get("links") or []):
            problems.append(f"link {link_id}: node {src} output {src_slot} does not list it")
        elif outs[src_slot].get("type") not in (type_, "*") and type_ != "*":
            problems.append(f"link {link_id}: type {type_} but node {src} output {src_slot} is {outs[src_slot].get('type')}")
        if not 0 <= dst_slot < len(ins) or ins[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: node {dst} input {dst_slot} does not point back at it")
    for n in wf["nodes"]:
        for slot in n.get("inputs") or []:
            if slot.get("link") is not None and slot["link"] not in link_ids:
                problems.append(f"node {n['id']} input '{slot.get('name')}' uses unknown link {slot['link']}")
        for slot in n.get("outputs") or []:
            for link_id in slot.get("links") or []:
                if link_id not in link_ids:
                    problems.append(f"node {n['id']} output '{slot.get('name')}' lists unknown link {link_id}")
    if nodes and max(k for k in nodes if isinstance(k, int)) > wf["last_node_id"]:
        problems.append("last_node_id is smaller than a node id (the frontend would reuse ids)")
    if link_ids and max(link_ids) > wf["last_link_id"]:
        problems.append("last_link_id is smaller than a link id")
    return problems


def test_there_is_at_least_one_workflow():
    assert any(p.name == "txt2img_core.json" for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_is_valid_ui_format(path):
    wf = convert.load_workflow(path)
    assert "nodes" in wf, f"{path.name} is not UI format (API-format files are not example workflows)"
    assert structure_problems(wf) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_nodes_links_and_widgets_match_the_schemas(path):
    prompt = convert.ui_to_api(convert.load_workflow(path), INFO, validate=True)
    assert prompt  # ui_to_api raises a WorkflowError naming the node on any mismatch


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_explains_itself_in_a_note(path):
    wf = convert.load_workflow(path)
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(isinstance(v, str) and len(v) > 40 for n in notes for v in n["widgets_values"][:1])


def test_core_workflow_uses_the_standard_sd15_file_name():
    wf = convert.load_workflow(ROOT / "workflows" / "txt2img_core.json")
    loaders = [n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    assert [n["widgets_values"][0] for n in loaders] == ["v1-5-pruned-emaonly.safetensors"]
    assert {n["type"] for n in wf["nodes"]} <= set(json.loads(SNAPSHOT.read_text())["nodes"]) | {"Note"}


# --------------------------------------------------------------------------------------------------
# the checks can fail: damaged copies of the core workflow


def core_copy():
    return convert.load_workflow(json.loads((ROOT / "workflows" / "txt2img_core.json").read_text()))


def _node(wf, type_):
    return next(n for n in wf["nodes"] if n["type"] == type_)


@pytest.mark.parametrize("damage, expected", [
    (lambda wf: wf["links"].pop(0), "uses unknown link 1"),
    (lambda wf: wf.pop("last_link_id"), "top-level key 'last_link_id' missing"),
    (lambda wf: wf["links"][0].__setitem__(5, "LATENT"), "link 1: type LATENT but node 4 output 0 is MODEL"),
    (lambda wf: _node(wf, "KSampler")["outputs"][0].__setitem__("links", []), "node 3 output 0 does not list it"),
    (lambda wf: _node(wf, "KSampler").__setitem__("mode", 7), "mode 7 is not one of"),
    (lambda wf: wf.__setitem__("last_node_id", 3), "last_node_id is smaller"),
])
def test_structure_checker_finds_damage(damage, expected):
    wf = core_copy()
    damage(wf)
    assert any(expected in p for p in structure_problems(wf)), structure_problems(wf)


@pytest.mark.parametrize("damage, expected", [
    (lambda wf: _node(wf, "KSampler")["widgets_values"].__setitem__(4, "euler_fancy"),
     r"node 3 \(KSampler\): 'sampler_name' = 'euler_fancy' is not one of the options"),
    (lambda wf: _node(wf, "KSampler")["widgets_values"].pop(1),
     r"widgets_values has 6 values but this ComfyUI's KSampler has 7 widget slots"),
    (lambda wf: _node(wf, "EmptyLatentImage")["widgets_values"].__setitem__(0, 5),
     r"node 5 \(EmptyLatentImage\): 'width' = 5 is below its minimum 16"),
    (lambda wf: _node(wf, "SaveImage").__setitem__("type", "SaveImageFancy"),
     r"node 9 \(SaveImageFancy\): node type 'SaveImageFancy' is not installed"),
    (lambda wf: wf["links"].__setitem__(8, [9, 4, 2, 9, 0, "VAE"]),
     r"node 9 \(SaveImage\): input 'images' expects IMAGE but is linked to output 2 \(VAE\)"),
])
def test_schema_checks_find_damage(damage, expected):
    wf = core_copy()
    damage(wf)
    with pytest.raises(convert.WorkflowError, match=expected):
        convert.ui_to_api(wf, INFO, validate=True)


def test_pack_samplers_are_accepted_in_sampler_lists():
    wf = core_copy()
    _node(wf, "KSampler")["widgets_values"][4] = "plms"
    assert convert.ui_to_api(wf, INFO, validate=True)["3"]["inputs"]["sampler_name"] == "plms"
