"""The pack's translations in ComfyUI's i18n format (``locales/<lang>/``), kept in step with the node schemas.

    python -m scripts.locales sync [--todo F]   # regenerate locales/en; drop translations of strings that are gone;
                                                # with --todo, also write the strings to (re)translate to F
    python -m scripts.locales check         # exit 1 if locales/en is out of date or a translation is missing/stale
    python -m scripts.locales todo -o F     # the strings to (re)translate, as JSON
    python -m scripts.locales apply F       # write the filled-in translations of F into locales/<lang>/

Run from the pack folder with the Python that runs the tests. After an English description or tooltip changed:
``sync --todo todo.json``, write each entry's ``"text"`` in todo.json (``"en"`` is the new English, ``"was"`` the
English the old translation was made from, ``"text"`` starts as the old translation), ``apply todo.json``.

ComfyUI (``app/custom_node_manager.py``) serves ``/i18n``: for each pack, ``locales/<lang>/main.json`` merged
with ``nodeDefs.json`` (and ``commands.json``, ``settings.json``) under those names. The frontend shows
``nodeDefs.<node id>.display_name`` / ``.description`` / ``.inputs.<input>.name|tooltip`` /
``.outputs.<index>.name|tooltip`` in place of the schema's words, ``nodeCategories.<part>`` for each part of a
category, ``dataTypes.<TYPE>`` for a socket type (and for an output whose name is its type, so no output name
is written then), and ``templateWorkflows.category.<pack folder>`` as the pack's entry in the template browser.

- ``locales/en/`` is generated here from NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, the inputs' tooltips,
  OUTPUT_TOOLTIPS and pyproject's display name: it is never edited by hand.
- ``locales/<lang>/nodeDefs.json`` and ``main.json`` are translations; ``locales/<lang>/sources.json`` (which
  ComfyUI does not read) holds, for each translated string, the English it translates. A translation whose
  English has changed since is *stale*; ``check`` and the static test list it.
"""
import argparse
import importlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRANSLATIONS = ("zh",)
FILES = ("main", "nodeDefs")
SOURCES = "sources.json"
# folder names the pack is installed under: a git clone as README says, and the Comfy Registry id
PACK_FOLDERS = ("atelier", "atelier-painting")


# --------------------------------------------------------------------------------------------------
# the English catalogue, from the node schemas


def node_defs(mappings, display_names):
    """nodeDefs.json for these node classes, in ComfyUI's layout."""
    defs = {}
    for node_id in sorted(mappings):
        cls = mappings[node_id]
        entry = {"display_name": display_names.get(node_id, node_id)}
        if getattr(cls, "DESCRIPTION", ""):
            entry["description"] = cls.DESCRIPTION
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in (cls.INPUT_TYPES().get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                inputs[name] = {"name": name, **({"tooltip": opts["tooltip"]} if opts.get("tooltip") else {})}
        entry["inputs"] = inputs
        types = tuple(cls.RETURN_TYPES)
        names = tuple(getattr(cls, "RETURN_NAMES", None) or types)
        tips = tuple(getattr(cls, "OUTPUT_TOOLTIPS", None) or (None,) * len(types))
        outputs = {}
        for index, (type_, name, tip) in enumerate(zip(types, names, tips)):
            outputs[str(index)] = {**({"name": name} if name != type_ else {}), **({"tooltip": tip} if tip else {})}
        entry["outputs"] = outputs
        defs[node_id] = entry
    return defs


def _socket_types(cls):
    types = set(cls.RETURN_TYPES)
    for section in ("required", "optional"):
        types.update(spec[0] for spec in (cls.INPUT_TYPES().get(section) or {}).values() if isinstance(spec[0], str))
    return types


def main_strings(mappings, pack_title):
    """main.json: the category parts, the pack's own socket types and its template-browser entry."""
    parts = sorted({part for cls in mappings.values() for part in cls.CATEGORY.split("/")})
    types = sorted({t for cls in mappings.values() for t in _socket_types(cls) if t.startswith("ATELIER_")})
    return {"nodeCategories": {p: p for p in parts}, "dataTypes": {t: t for t in types},
            "templateWorkflows": {"category": {name: pack_title for name in PACK_FOLDERS}}}


def pack_title(root=ROOT):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfy"]["DisplayName"]


def english(root=ROOT):
    """{"main": ..., "nodeDefs": ...} as locales/en must hold them."""
    nodes = importlib.import_module("atelier.nodes")
    return {"main": main_strings(nodes.NODE_CLASS_MAPPINGS, pack_title(root)),
            "nodeDefs": node_defs(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)}


# --------------------------------------------------------------------------------------------------
# flat keys ("nodeDefs.AtelierPLMSSampler.inputs.order.tooltip") and the files


def flatten(files):
    """{flat key: string} of {"main": tree, "nodeDefs": tree}, in the trees' order."""
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}.{key}")
            else:
                flat[f"{prefix}.{key}"] = value

    for name in FILES:
        walk(files.get(name, {}), name)
    return flat


def unflatten(flat, order):
    """The files of ``flat``, keys in the order of ``order`` (the English flat keys)."""
    files = {name: {} for name in FILES}
    for key in [k for k in order if k in flat] + [k for k in flat if k not in order]:
        name, *path = key.split(".")
        node = files[name]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = flat[key]
    return files


def _read(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def dump(data):
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def _write(path, data):
    from atelier.common.files import atomic_write

    text = dump(data)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write(path, text)
        return True
    return False


def read_lang(root, lang):
    folder = root / "locales" / lang
    return flatten({name: _read(folder / f"{name}.json") for name in FILES})


def read_sources(root, lang):
    return _read(root / "locales" / lang / SOURCES)


def write_lang(root, lang, flat, sources, order):
    folder = root / "locales" / lang
    changed = False
    for name, tree in unflatten(flat, order).items():
        if tree or (folder / f"{name}.json").is_file():
            changed |= _write(folder / f"{name}.json", tree)
    if sources is not None and (sources or (folder / SOURCES).is_file()):
        changed |= _write(folder / SOURCES, {k: sources[k] for k in order if k in sources})
    return changed


# --------------------------------------------------------------------------------------------------
# what is out of step


def status(en, flat, sources):
    """{"missing": [...], "stale": [...], "orphan": [...]} flat keys of one translation against the English."""
    return {"missing": [k for k in en if k not in flat],
            "stale": [k for k in en if k in flat and sources.get(k) != en[k]],
            "orphan": [k for k in flat if k not in en]}


def problems(root=ROOT, en=None):
    """Readable lines for everything ``check`` fails on (empty: in step)."""
    en = english(root) if en is None else en
    lines = []
    for name in FILES:
        path = root / "locales" / "en" / f"{name}.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != dump(en[name]):
            lines.append(f"locales/en/{name}.json is not what the node schemas say: run `python -m scripts.locales sync`")
    en_flat = flatten(en)
    for lang in TRANSLATIONS:
        found = status(en_flat, read_lang(root, lang), read_sources(root, lang))
        for kind, keys in found.items():
            lines += [f"locales/{lang}: {kind}: {key}" for key in keys]
    return lines


def sync(root=ROOT, en=None):
    """Write locales/en from the schemas; drop translations (and their sources) of strings that are gone."""
    en = english(root) if en is None else en
    order = list(flatten(en))
    written = [_write(root / "locales" / "en" / f"{name}.json", en[name]) for name in FILES]  # every file
    changed = ["locales/en"] if any(written) else []
    for lang in TRANSLATIONS:
        flat, sources = read_lang(root, lang), read_sources(root, lang)
        for key in [k for k in flat if k not in set(order)]:
            flat.pop(key)
            sources.pop(key, None)
        if write_lang(root, lang, flat, sources, order):
            changed.append(f"locales/{lang}")
    return changed


def todo(root=ROOT, en=None):
    """{lang: {key: {"en": English now, "was": English translated before (None: never), "text": translation}}}."""
    en_flat = flatten(english(root) if en is None else en)
    out = {}
    for lang in TRANSLATIONS:
        flat, sources = read_lang(root, lang), read_sources(root, lang)
        found = status(en_flat, flat, sources)
        out[lang] = {k: {"en": en_flat[k], "was": sources.get(k), "text": flat.get(k, "")}
                     for k in en_flat if k in found["missing"] or k in found["stale"]}
    return out


def apply(entries, root=ROOT, en=None):
    """Write the non-empty ``"text"`` of each todo entry as the translation of the English it names.

    An entry whose ``"en"`` is no longer the English of its key is refused (the English changed again since the
    todo file was made): returns the list of refused keys."""
    en_flat = flatten(english(root) if en is None else en)
    refused = []
    for lang, items in entries.items():
        if lang not in TRANSLATIONS:
            raise ValueError(f"unknown language {lang!r} (translations: {', '.join(TRANSLATIONS)})")
        flat, sources = read_lang(root, lang), read_sources(root, lang)
        for key, item in items.items():
            text = (item.get("text") or "").strip()
            if not text:
                continue
            if en_flat.get(key) != item.get("en"):
                refused.append(f"{lang}: {key}")
                continue
            flat[key], sources[key] = text, en_flat[key]
        write_lang(root, lang, flat, sources, list(en_flat))
    return refused


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.locales", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    y = sub.add_parser("sync", help="regenerate locales/en from the node schemas; drop translations of removed strings")
    y.add_argument("--todo", metavar="FILE", help="also write the strings to (re)translate to FILE (as `todo -o`)")
    sub.add_parser("check", help="exit 1 if locales/en is out of date or a translation is missing or stale")
    t = sub.add_parser("todo", help="the strings to (re)translate, as JSON")
    t.add_argument("-o", "--output", help="write the JSON here instead of printing it")
    a = sub.add_parser("apply", help="write the filled-in translations of a todo file")
    a.add_argument("file")
    args = ap.parse_args(argv)
    if args.cmd == "sync":
        changed = sync()
        print("updated: " + ", ".join(changed) if changed else "locales/ already in step with the node schemas")
        en_flat = flatten(english())
        for lang in TRANSLATIONS:
            found = status(en_flat, read_lang(ROOT, lang), read_sources(ROOT, lang))
            counts = ", ".join(f"{len(keys)} {kind}" for kind, keys in found.items() if kind != "orphan")
            print(f"locales/{lang}: {counts}")
        if args.todo:
            pathlib.Path(args.todo).write_text(dump(todo()), encoding="utf-8")
            print(f"wrote {args.todo}: fill in each \"text\", then `python -m scripts.locales apply {args.todo}`")
        return 0
    if args.cmd == "check":
        left = problems()
        print("\n".join(left) if left else "locales/ in step: every translation is current")
        return 1 if left else 0
    if args.cmd == "todo":
        text = dump(todo())
        if args.output:
            pathlib.Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}: fill in each \"text\", then `python -m scripts.locales apply {args.output}`")
        else:
            sys.stdout.write(text)
        return 0
    refused = apply(json.loads(pathlib.Path(args.file).read_text(encoding="utf-8")))
    for key in refused:
        print(f"refused (its English changed since the todo file was made): {key}", file=sys.stderr)
    left = problems()
    print("\n".join(left) if left else "every translation is current")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
