"""Static layer: every node of the pack has a well-formed V1 schema, as ComfyUI reads it.

``schema_problems`` lists what is wrong with one node class; it is run on every node in the pack's
NODE_CLASS_MAPPINGS and, so that the checker itself is tested, on hand-made good and bad classes.
"""
import importlib
import inspect
import json
import math
import pathlib

import pytest

SNAPSHOT = pathlib.Path(__file__).with_name("core_object_info.json")
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
INPUT_SECTIONS = {"required", "optional", "hidden"}
HIDDEN_VALUES = {"UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG"}


def core_types():
    """Every socket type the core nodes use (inputs and outputs), from the committed snapshot."""
    nodes = json.loads(SNAPSHOT.read_text(encoding="utf-8"))["nodes"]
    types = set(WIDGETS) | {"*"}
    for node in nodes.values():
        for specs in node["input"].values():
            for spec in specs.values():
                if isinstance(spec[0], str):
                    types.update(spec[0].split(","))
        types.update(t for t in node.get("output", []) if isinstance(t, str))
    return types


CORE_TYPES = core_types()


def known_type(type_):
    return all(t in CORE_TYPES or t.startswith("ATELIER_") for t in str(type_).split(","))


def _default_problems(name, type_, opts):
    problems = []
    if "default" not in opts:
        return problems
    default = opts["default"]
    if isinstance(type_, (list, tuple)) or type_ == "COMBO":
        options = list(type_) if isinstance(type_, (list, tuple)) else opts.get("options", [])
        if options and default not in options:
            problems.append(f"input '{name}': combo default {default!r} is not in its options")
        return problems
    if type_ == "INT" and (isinstance(default, bool) or not isinstance(default, int)):
        problems.append(f"input '{name}': INT default {default!r} is not an int")
    elif type_ == "FLOAT" and (isinstance(default, bool) or not isinstance(default, (int, float))
                               or not math.isfinite(default)):
        problems.append(f"input '{name}': FLOAT default {default!r} is not a finite number")
    elif type_ == "STRING" and not isinstance(default, str):
        problems.append(f"input '{name}': STRING default {default!r} is not a string")
    elif type_ == "BOOLEAN" and not isinstance(default, bool):
        problems.append(f"input '{name}': BOOLEAN default {default!r} is not a bool")
    if type_ in ("INT", "FLOAT") and isinstance(default, (int, float)):
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"input '{name}': min {lo} > max {hi}")
        if lo is not None and default < lo:
            problems.append(f"input '{name}': default {default} is below min {lo}")
        if hi is not None and default > hi:
            problems.append(f"input '{name}': default {default} is above max {hi}")
    return problems


def schema_problems(node_id, cls, display_names):
    """Everything wrong with a V1 node class, as readable strings (empty list: the schema is fine)."""
    problems = []
    if not node_id.startswith("Atelier"):
        problems.append(f"node id {node_id!r} does not start with 'Atelier'")
    if node_id not in display_names:
        problems.append("no entry in NODE_DISPLAY_NAME_MAPPINGS")
    if not isinstance(inspect.getattr_static(cls, "INPUT_TYPES", None), classmethod):
        return problems + ["INPUT_TYPES is not a classmethod"]
    types = cls.INPUT_TYPES()
    if not isinstance(types, dict) or not set(types) <= INPUT_SECTIONS:
        return problems + [f"INPUT_TYPES must return a dict with keys among {sorted(INPUT_SECTIONS)}"]
    names = []
    for section, specs in types.items():
        if not isinstance(specs, dict):
            problems.append(f"INPUT_TYPES[{section!r}] is not a dict")
            continue
        for name, spec in specs.items():
            names.append((section, name))
            if section == "hidden":
                if spec not in HIDDEN_VALUES and not (isinstance(spec, tuple) and spec and spec[0] in HIDDEN_VALUES):
                    problems.append(f"hidden input '{name}': unknown hidden value {spec!r}")
                continue
            if not isinstance(spec, (tuple, list)) or not 1 <= len(spec) <= 2:
                problems.append(f"input '{name}': spec must be (TYPE,) or (TYPE, options)")
                continue
            type_, opts = spec[0], (spec[1] if len(spec) == 2 else {})
            if not isinstance(opts, dict):
                problems.append(f"input '{name}': options must be a dict")
                continue
            if isinstance(type_, (list, tuple)):
                if not type_ or not all(isinstance(o, str) for o in type_):
                    # an empty list is fine only for file combos filled at run time; they must say so
                    if not (isinstance(type_, list) and not type_ and opts.get("tooltip")):
                        problems.append(f"input '{name}': combo options must be a non-empty list of strings")
            elif not isinstance(type_, str):
                problems.append(f"input '{name}': type must be a string or a list of options")
            elif not known_type(type_):
                problems.append(f"input '{name}': unknown type {type_!r} (custom types start with ATELIER_)")
            if not isinstance(opts.get("tooltip"), str) or not opts["tooltip"].strip():
                problems.append(f"input '{name}': no tooltip")
            problems += _default_problems(name, type_, opts)
    returns = getattr(cls, "RETURN_TYPES", None)
    if not isinstance(returns, tuple):
        problems.append("RETURN_TYPES must be a tuple")
        returns = ()
    for type_ in returns:
        if not isinstance(type_, (str, list)) or (isinstance(type_, str) and not known_type(type_)):
            problems.append(f"output type {type_!r} is unknown (custom types start with ATELIER_)")
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST"):
        value = getattr(cls, attr, None)
        if value is not None and (not isinstance(value, tuple) or len(value) != len(returns)):
            problems.append(f"{attr} must be a tuple as long as RETURN_TYPES ({len(returns)})")
    if returns and getattr(cls, "OUTPUT_TOOLTIPS", None) is None:
        problems.append("no OUTPUT_TOOLTIPS")
    function = getattr(cls, "FUNCTION", None)
    method = getattr(cls, function, None) if isinstance(function, str) else None
    if not callable(method):
        problems.append(f"FUNCTION {function!r} is not a method of the class")
    else:
        params = inspect.signature(method).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for section, name in names:
            if section == "hidden":
                continue
            if name not in params and not takes_kwargs:
                problems.append(f"FUNCTION {function}() has no parameter for input '{name}'")
            elif section == "optional" and name in params and params[name].default is inspect.Parameter.empty:
                problems.append(f"optional input '{name}' needs a default in {function}()")
    category = getattr(cls, "CATEGORY", "")
    if not isinstance(category, str) or not category.startswith("atelier/"):
        problems.append(f"CATEGORY {category!r} is not under 'atelier/'")
    description = getattr(cls, "DESCRIPTION", None)
    if not isinstance(description, str) or not description.strip():
        problems.append("no DESCRIPTION")
    for hook in ("IS_CHANGED", "VALIDATE_INPUTS"):
        if hasattr(cls, hook) and not isinstance(inspect.getattr_static(cls, hook), classmethod):
            problems.append(f"{hook} must be a classmethod (ComfyUI calls it on the class)")
    if not isinstance(getattr(cls, "OUTPUT_NODE", False), bool):
        problems.append("OUTPUT_NODE must be a bool")
    return problems


def pack_nodes():
    pack = importlib.import_module("atelier.nodes")
    return pack, sorted(pack.NODE_CLASS_MAPPINGS.items())


PACK, NODES = pack_nodes()


@pytest.mark.parametrize("node_id, cls", NODES, ids=[n for n, _ in NODES])
def test_pack_node_schema(node_id, cls):
    problems = schema_problems(node_id, cls, PACK.NODE_DISPLAY_NAME_MAPPINGS)
    assert not problems, f"{node_id}:\n  " + "\n  ".join(problems)


def test_node_ids_and_custom_types_are_namespaced():
    for node_id, cls in NODES:
        assert node_id.startswith("Atelier")
        for type_ in cls.RETURN_TYPES:
            assert type_ in CORE_TYPES or str(type_).startswith("ATELIER_") or isinstance(type_, list), (node_id, type_)


# --------------------------------------------------------------------------------------------------
# the checker on hand-made classes


class GoodNode:
    DESCRIPTION = "Blends two images."
    CATEGORY = "atelier/image"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "ATELIER_NEIGHBORS")
    RETURN_NAMES = ("image", "neighbors")
    OUTPUT_TOOLTIPS = ("the blend", "the neighbours")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "input"}),
                             "k": ("INT", {"default": 4, "min": 1, "max": 8, "tooltip": "how many"}),
                             "mode": (["a", "b"], {"default": "b", "tooltip": "mode"})},
                "optional": {"w": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "tooltip": "weight"})},
                "hidden": {"uid": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return ""

    def run(self, image, k, mode, w=0.5, uid=None):
        return image, None


def _variant(**changes):
    inputs = changes.pop("inputs", None)
    attrs = dict(changes)
    if inputs is not None:
        attrs["INPUT_TYPES"] = classmethod(lambda cls: inputs)
    return type("Variant", (GoodNode,), attrs)


def test_checker_accepts_a_good_node():
    assert schema_problems("AtelierGood", GoodNode, {"AtelierGood": "Good"}) == []


@pytest.mark.parametrize("node_id, cls, expected", [
    ("Good", GoodNode, "does not start with 'Atelier'"),
    ("AtelierX", _variant(inputs={"required": {"k": ("INT", {"default": 9, "max": 8, "tooltip": "t"})}}),
     "default 9 is above max 8"),
    ("AtelierX", _variant(inputs={"required": {"k": ("INT", {"default": 0, "min": 1, "tooltip": "t"})}}),
     "default 0 is below min 1"),
    ("AtelierX", _variant(inputs={"required": {"k": ("INT", {"default": 1.5, "tooltip": "t"})}}),
     "INT default 1.5 is not an int"),
    ("AtelierX", _variant(inputs={"required": {"mode": (["a", "b"], {"default": "c", "tooltip": "t"})}}),
     "combo default 'c' is not in its options"),
    ("AtelierX", _variant(inputs={"required": {"image": ("IMAGE",)}}), "input 'image': no tooltip"),
    ("AtelierX", _variant(inputs={"required": {"x": ("MYTYPE", {"tooltip": "t"})}}), "unknown type 'MYTYPE'"),
    ("AtelierX", _variant(inputs={"required": {"image": ("IMAGE", {"tooltip": "t"}), "extra": ("INT", {"tooltip": "t"})}}),
     "has no parameter for input 'extra'"),
    ("AtelierX", _variant(inputs={"required": {}, "optional": {"image": ("IMAGE", {"tooltip": "t"})}}),
     "optional input 'image' needs a default"),
    ("AtelierX", _variant(inputs={"requird": {}}), "INPUT_TYPES must return a dict with keys"),
    ("AtelierX", _variant(RETURN_TYPES=["IMAGE"]), "RETURN_TYPES must be a tuple"),
    ("AtelierX", _variant(RETURN_TYPES=("PICTURE",), RETURN_NAMES=("p",), OUTPUT_TOOLTIPS=("p",)),
     "output type 'PICTURE' is unknown"),
    ("AtelierX", _variant(RETURN_NAMES=("only_one",)), "RETURN_NAMES must be a tuple as long as RETURN_TYPES"),
    ("AtelierX", _variant(OUTPUT_TOOLTIPS=None), "no OUTPUT_TOOLTIPS"),
    ("AtelierX", _variant(FUNCTION="missing"), "FUNCTION 'missing' is not a method"),
    ("AtelierX", _variant(CATEGORY="sampling"), "CATEGORY 'sampling' is not under 'atelier/'"),
    ("AtelierX", _variant(DESCRIPTION=""), "no DESCRIPTION"),
    ("AtelierX", _variant(IS_CHANGED=lambda self: ""), "IS_CHANGED must be a classmethod"),
    ("AtelierX", _variant(INPUT_TYPES=lambda: {}), "INPUT_TYPES is not a classmethod"),
])
def test_checker_finds_each_problem(node_id, cls, expected):
    problems = schema_problems(node_id, cls, {node_id: "X"})
    assert any(expected in p for p in problems), problems


def test_core_snapshot_is_complete_enough():
    nodes = json.loads(SNAPSHOT.read_text(encoding="utf-8"))["nodes"]
    assert len(nodes) > 300
    samplers = nodes["KSampler"]["input"]["required"]["sampler_name"][0]
    assert {"euler", "ddim", "dpmpp_2m", "ipndm", "uni_pc"} <= set(samplers)
    assert "karras" in nodes["KSampler"]["input"]["required"]["scheduler"][0]
    assert {"IMAGE", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "UPSCALE_MODEL"} <= CORE_TYPES
