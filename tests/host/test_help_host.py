"""Host layer: the in-app help, translations and templates as a real ComfyUI serves them to its frontend.

The frontend (1.39) derives the pack folder from a node's ``python_module`` (``custom_nodes.<folder>``), fetches
``/extensions/<folder>/docs/<node id>/<locale>.md`` then ``.../docs/<node id>.md`` (an answer that is HTML counts as
missing), merges ``/i18n`` into its messages, and lists ``/workflow_templates`` under the pack.
"""
import json
import pathlib
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def fetch(server, path):
    with urllib.request.urlopen(server.url + path, timeout=60) as resp:
        return resp.status, resp.headers.get("content-type", ""), resp.read()


@pytest.fixture(scope="module")
def folder(comfy_server, pack_node_ids):
    modules = {comfy_server.object_info()[node_id]["python_module"] for node_id in pack_node_ids}
    assert len(modules) == 1 and next(iter(modules)).startswith("custom_nodes."), modules
    return next(iter(modules)).split(".", 1)[1]


def test_help_pages_are_served_where_the_frontend_looks(comfy_server, pack_node_ids, folder):
    for node_id in pack_node_ids:
        for rel in (f"docs/{node_id}.md", f"docs/{node_id}/zh.md"):
            status, ctype, body = fetch(comfy_server, f"/extensions/{folder}/{rel}")
            assert status == 200 and "text/html" not in ctype, (rel, status, ctype)
            assert body.decode("utf-8") == (ROOT / "web" / rel).read_text(encoding="utf-8")


def test_no_script_is_loaded_from_the_pack(comfy_server, folder):
    scripts = [e for e in comfy_server.get_json("/extensions") if e.startswith(f"/extensions/{folder}/")]
    assert scripts == []


def test_i18n_serves_the_pack_translations(comfy_server, pack_node_ids):
    served = comfy_server.get_json("/i18n")
    for lang in ("en", "zh"):
        folder = ROOT / "locales" / lang
        defs = json.loads((folder / "nodeDefs.json").read_text(encoding="utf-8"))
        main = json.loads((folder / "main.json").read_text(encoding="utf-8"))
        assert {n: served[lang]["nodeDefs"][n] for n in pack_node_ids} == defs, lang
        for section, entries in main.items():
            for key, value in entries.items():
                assert served[lang][section][key] == value, (lang, section, key)
    assert "sources" not in served["zh"], "locales/zh/sources.json is for the maintainers, not for ComfyUI"


def test_templates_are_listed_by_file_name_only(comfy_server, folder):
    """ComfyUI 0.15.1 lists a pack's templates as bare names; there is no title or description to give."""
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed[folder]) == sorted(p.stem for p in WORKFLOWS)
    assert all(isinstance(name, str) for name in listed[folder])
    status, _, body = fetch(comfy_server, f"/api/workflow_templates/{folder}/{WORKFLOWS[0].name}")
    assert status == 200 and json.loads(body) == json.loads(WORKFLOWS[0].read_text(encoding="utf-8"))
    status, _, body = fetch(comfy_server, f"/api/workflow_templates/{folder}/{WORKFLOWS[0].stem}.jpg")
    assert status == 200 and body[:3] == b"\xff\xd8\xff"
