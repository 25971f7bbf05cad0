"""Static layer: ``locales/`` in ComfyUI's i18n format, English generated from the node schemas, Chinese current.

``scripts/locales.py`` writes ``locales/en`` from the schemas; ``locales/zh/sources.json`` records the English each
Chinese string translates, so a changed English tooltip shows up here as a stale translation. Fix with
``python -m scripts.locales sync --todo todo.json``, translate, ``apply todo.json`` (see the script).
"""
import json
import pathlib
import re

import pytest
from atelier.scripts import locales
from test_node_schemas import NODES

ROOT = pathlib.Path(__file__).resolve().parents[2]
EN = locales.english()
EN_FLAT = locales.flatten(EN)
CJK = re.compile(r"[\u4e00-\u9fff]")
PLACEHOLDER = re.compile(r"\{\w+\}")
CODE = re.compile(r"`([^`]+)`")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
SEED_NAME = re.compile(r"\bseeds? \d{3}(?:(?:, | \+ | and )\d{3})*")  # internal paper numbers, never translated


def translated(lang):
    return locales.read_lang(ROOT, lang)


@pytest.mark.parametrize("name", locales.FILES)
def test_english_is_generated_from_the_node_schemas(name):
    path = ROOT / "locales" / "en" / f"{name}.json"
    assert path.is_file() and path.read_text(encoding="utf-8") == locales.dump(EN[name]), (
        f"locales/en/{name}.json differs from the node schemas: run `python -m scripts.locales sync`")


def test_node_defs_have_comfyui_layout():
    """What the frontend reads: display_name, description, inputs.<name>.{name,tooltip}, outputs.<index>.{name,tooltip}."""
    defs = EN["nodeDefs"]
    assert sorted(defs) == sorted(node_id for node_id, _ in NODES)
    for node_id, cls in NODES:
        entry = defs[node_id]
        assert set(entry) <= {"display_name", "description", "inputs", "outputs"} and entry["display_name"]
        types = cls.INPUT_TYPES()
        assert list(entry["inputs"]) == [n for s in ("required", "optional") for n in (types.get(s) or {})]
        assert all(set(item) <= {"name", "tooltip"} for item in entry["inputs"].values())
        assert list(entry["outputs"]) == [str(i) for i in range(len(cls.RETURN_TYPES))]
        assert all(set(item) <= {"name", "tooltip"} for item in entry["outputs"].values())


@pytest.mark.parametrize("lang", locales.TRANSLATIONS)
def test_translation_is_complete_and_current(lang):
    flat, sources = translated(lang), locales.read_sources(ROOT, lang)
    found = locales.status(EN_FLAT, flat, sources)
    lines = [f"missing: {k}" for k in found["missing"]] + [f"no such string any more: {k}" for k in found["orphan"]]
    lines += [f"stale: {k}\n    translated from: {sources.get(k)!r}\n    English now:     {EN_FLAT[k]!r}"
              for k in found["stale"]]
    assert not lines, (f"locales/{lang} is behind the English ({len(lines)}); `python -m scripts.locales sync --todo "
                       f"todo.json`, translate each \"text\", `python -m scripts.locales apply todo.json`:\n"
                       + "\n".join(lines))


@pytest.mark.parametrize("lang", locales.TRANSLATIONS)
def test_translation_keeps_placeholders_code_and_numbers(lang):
    """A translation keeps {fields}, `code` and every number of its English (internal paper numbers excepted)."""
    bad = []
    for key, text in translated(lang).items():
        english = EN_FLAT.get(key)
        if english is None or key.endswith(".name"):
            continue
        if sorted(PLACEHOLDER.findall(text)) != sorted(PLACEHOLDER.findall(english)):
            bad.append(f"{key}: placeholders {PLACEHOLDER.findall(english)}")
        if not set(CODE.findall(english)) <= set(CODE.findall(text)):
            bad.append(f"{key}: code spans {sorted(set(CODE.findall(english)) - set(CODE.findall(text)))}")
        missing = set(NUMBER.findall(SEED_NAME.sub("", english))) - set(NUMBER.findall(text))
        if missing:
            bad.append(f"{key}: numbers {sorted(missing)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("lang", locales.TRANSLATIONS)
def test_descriptions_and_tooltips_are_translated(lang):
    flat = translated(lang)
    untranslated = [k for k, text in flat.items() if k.startswith("nodeDefs.")
                    and k.rsplit(".", 1)[1] in ("description", "tooltip", "display_name") and not CJK.search(text)]
    assert not untranslated, f"locales/{lang}: no Chinese in {untranslated}"


def test_pack_folder_names_match_install_names():
    """The template browser's entry for the pack is keyed by the pack's folder: the README's clone folder and
    the Registry id (pyproject's project name)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    name = re.search(r'^name = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.MULTILINE).group(1)
    assert set(locales.PACK_FOLDERS) == {"atelier", name}
    assert "git clone <this repository> atelier" in readme


# --------------------------------------------------------------------------------------------------
# the script's round trip, on a throw-away locales folder


def _en(tooltip):
    return {"main": {"nodeCategories": {"atelier": "atelier"}},
            "nodeDefs": {"AtelierX": {"display_name": "X (Atelier)", "inputs": {"k": {"name": "k", "tooltip": tooltip}},
                                      "outputs": {}}}}


def test_script_round_trip(tmp_path):
    en = _en("How many neighbours (19).")
    assert locales.sync(tmp_path, en) == ["locales/en"]
    assert locales.problems(tmp_path, en) == [f"locales/zh: missing: {k}" for k in locales.flatten(en)]
    todo = locales.todo(tmp_path, en)
    todo["zh"]["nodeDefs.AtelierX.inputs.k.tooltip"]["text"] = "近邻数量（19）。"
    for key in ("main.nodeCategories.atelier", "nodeDefs.AtelierX.display_name", "nodeDefs.AtelierX.inputs.k.name"):
        todo["zh"][key]["text"] = {"main.nodeCategories.atelier": "Atelier"}.get(key, todo["zh"][key]["en"])
    assert locales.apply(todo, tmp_path, en) == []
    assert locales.problems(tmp_path, en) == []
    zh = json.loads((tmp_path / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert zh["AtelierX"]["inputs"]["k"]["tooltip"] == "近邻数量（19）。"

    # the English changes: that one translation is stale, the todo says what it was translated from
    en2 = _en("Number of neighbours (19 in the paper).")
    assert locales.problems(tmp_path, en2)[0].startswith("locales/en/nodeDefs.json is not what")
    locales.sync(tmp_path, en2)
    assert locales.problems(tmp_path, en2) == ["locales/zh: stale: nodeDefs.AtelierX.inputs.k.tooltip"]
    item = locales.todo(tmp_path, en2)["zh"]["nodeDefs.AtelierX.inputs.k.tooltip"]
    assert item == {"en": "Number of neighbours (19 in the paper).", "was": "How many neighbours (19).",
                    "text": "近邻数量（19）。"}
    # a todo made before a further change is refused, never recorded against the wrong English
    stale_todo = {"zh": {"nodeDefs.AtelierX.inputs.k.tooltip": {**item, "en": "old", "text": "近邻数量（论文中为 19）。"}}}
    assert locales.apply(stale_todo, tmp_path, en2) == ["zh: nodeDefs.AtelierX.inputs.k.tooltip"]
    item["text"] = "近邻数量（论文中为 19）。"
    assert locales.apply({"zh": {"nodeDefs.AtelierX.inputs.k.tooltip": item}}, tmp_path, en2) == []
    assert locales.problems(tmp_path, en2) == []

    # an input disappears: sync drops its translation and its source
    en3 = {**en2, "nodeDefs": {"AtelierX": {"display_name": "X (Atelier)", "inputs": {}, "outputs": {}}}}
    locales.sync(tmp_path, en3)
    assert locales.problems(tmp_path, en3) == []
    sources = json.loads((tmp_path / "locales" / "zh" / "sources.json").read_text(encoding="utf-8"))
    assert sorted(sources) == ["main.nodeCategories.atelier", "nodeDefs.AtelierX.display_name"]


def test_node_defs_writer_on_a_hand_made_class():
    class Node:
        DESCRIPTION = "d"
        CATEGORY = "atelier/x"
        RETURN_TYPES = ("MODEL", "STRING")
        RETURN_NAMES = ("MODEL", "report")
        OUTPUT_TOOLTIPS = ("m", "r")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"a": ("INT", {"tooltip": "ta"})}, "optional": {"b": ("MODEL",)},
                    "hidden": {"uid": "UNIQUE_ID"}}

    defs = locales.node_defs({"AtelierN": Node}, {"AtelierN": "N (Atelier)"})
    assert defs == {"AtelierN": {"display_name": "N (Atelier)", "description": "d",
                                 "inputs": {"a": {"name": "a", "tooltip": "ta"}, "b": {"name": "b"}},
                                 "outputs": {"0": {"tooltip": "m"}, "1": {"name": "report", "tooltip": "r"}}}}
    assert locales.main_strings({"AtelierN": Node}, "T")["nodeCategories"] == {"atelier": "atelier", "x": "x"}
