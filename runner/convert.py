"""UI-format workflow (what the ComfyUI frontend saves) -> API-format prompt (what ``POST /prompt`` takes).

The server never does this conversion; the frontend does it in the browser. This module repeats the
frontend's rules (ComfyUI_frontend 1.39, read off its bundled JavaScript) using the schemas from
``/object_info``:

* ``widgets_values`` is positional over the node's widget inputs in ``input_order`` (required, then
  optional). INT inputs with ``control_after_generate`` (or, when that key is absent, named ``seed`` /
  ``noise_seed``) are followed by the frontend-only "control after generate" value; combos with it are
  followed by that value and a filter string; ``image_upload``/``video_upload`` combos by one upload
  value, ``audio_upload`` by two.
* A linked input (a widget converted to an input, or a socket) takes the link instead of the value.
* Muted nodes (mode 2) are left out, and inputs that came from them are dropped. Bypassed nodes (mode 4)
  are left out and pass through: a consumer of their output slot ``s`` gets what feeds their input ``s``
  if its type matches, else their first input of the consumer's type.
* ``Reroute`` nodes are followed, ``PrimitiveNode`` values are copied into their targets, ``Note`` and
  ``MarkdownNote`` are dropped.
* Subgraphs and group nodes are refused with a clear error: never a wrong graph.

Every error is a WorkflowError whose message names the node (id, type, title) and what to fix.
``validate=True`` also checks widget value types, numeric ranges, combo membership and link types, so the
static tests and the runner agree on what a good workflow is.
"""
import json
import math
import pathlib

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
DROPPED_NODES = {"Note", "MarkdownNote"}
MODE_MUTED = 2
MODE_BYPASS = 4
FRONTEND_ONLY = object()  # placeholder name for values that only the frontend uses
# Combos whose options are the user's files: membership is not checked statically.
FILE_OPTION_HINTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp",
                     ".gguf", ".sft", ".onnx", ".yaml", ".json", ".mp4", ".wav", ".mp3", ".flac")


class WorkflowError(ValueError):
    """A workflow problem, with a message meant for the user."""


# --------------------------------------------------------------------------------------------------
# loading


def load_workflow(source):
    """A workflow dict from a path, a JSON string or a dict. Malformed JSON gives a WorkflowError."""
    if isinstance(source, dict):
        return source
    if isinstance(source, pathlib.Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        path = pathlib.Path(source)
        if not path.is_file():
            raise WorkflowError(f"workflow file not found: {path}")
        text = path.read_text(encoding="utf-8")
        where = str(path)
    else:
        text, where = source, "<workflow>"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkflowError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{where}: a workflow is a JSON object, got {type(data).__name__}")
    return data


def is_api_format(data):
    """True for an API-format prompt: {"<id>": {"class_type": ..., "inputs": {...}}}."""
    return bool(data) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values()
    )


# --------------------------------------------------------------------------------------------------
# schemas


def node_info_from_class(node_id, cls):
    """An /object_info-style entry built from a V1 node class (for static checks without a server)."""
    types = cls.INPUT_TYPES()
    inputs = {sec: {k: list(v) for k, v in types.get(sec, {}).items()} for sec in ("required", "optional")}
    return {
        "input": {k: v for k, v in inputs.items() if v},
        "input_order": {sec: list(types.get(sec, {})) for sec in ("required", "optional") if types.get(sec)},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "name": node_id,
        "python_module": "custom_nodes.atelier",
    }


def input_spec(info, name):
    """(type, options, required) of input ``name`` or None."""
    for sec in ("required", "optional"):
        spec = info.get("input", {}).get(sec, {}).get(name)
        if spec is not None:
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], opts, sec == "required"
    return None


def combo_options(type_, opts):
    """The option list of a combo input, or None if the input is not a combo."""
    if isinstance(type_, (list, tuple)):
        return list(type_)
    if type_ == "COMBO":
        return list(opts.get("options", []))
    return None


def is_widget(type_, opts):
    if isinstance(type_, (list, tuple)):
        return True
    return type_ in WIDGET_TYPES and not opts.get("forceInput")


def ordered_inputs(info):
    order = info.get("input_order")
    out = []
    for sec in ("required", "optional"):
        names = (order or {}).get(sec) or list(info.get("input", {}).get(sec, {}))
        out += [n for n in names if n in info.get("input", {}).get(sec, {})]
    return out


def widget_layout(info):
    """The frontend's widget slots in ``widgets_values`` order: input names, FRONTEND_ONLY for the extras."""
    layout = []
    for name in ordered_inputs(info):
        type_, opts, _ = input_spec(info, name)
        if not is_widget(type_, opts):
            continue
        layout.append(name)
        is_combo = combo_options(type_, opts) is not None
        if type_ == "INT":
            control = opts.get("control_after_generate")
            if control is None:
                control = name in ("seed", "noise_seed")
            if control:
                layout.append(FRONTEND_ONLY)
        elif is_combo:
            if opts.get("control_after_generate"):
                layout += [FRONTEND_ONLY, FRONTEND_ONLY]
            if opts.get("image_upload") or opts.get("video_upload"):
                layout.append(FRONTEND_ONLY)
            elif opts.get("audio_upload"):
                layout += [FRONTEND_ONLY, FRONTEND_ONLY]
    return layout


def looks_like_file_combo(options):
    return any(isinstance(o, str) and o.lower().endswith(FILE_OPTION_HINTS) for o in options)


def types_match(out_type, in_type):
    """ComfyUI's socket type rule: equal, '*' on either side, or overlapping comma-separated unions."""
    if isinstance(in_type, (list, tuple)):
        in_type = "COMBO"
    if isinstance(out_type, (list, tuple)):
        out_type = "COMBO"
    if out_type == "*" or in_type == "*" or out_type == in_type:
        return True
    return bool(set(str(out_type).split(",")) & set(str(in_type).split(",")))


def check_value(where, name, type_, opts, value, check_files=False):
    """Coerce and check a widget value against its input spec; returns the value to send."""
    options = combo_options(type_, opts)
    if options is not None:
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise WorkflowError(f"{where}: '{name}' must be one of the listed options, got {value!r}")
        file_like = looks_like_file_combo(options) or looks_like_file_combo([value])
        if options and value not in options and (check_files or not file_like):
            shown = ", ".join(map(repr, options[:12])) + (" ..." if len(options) > 12 else "")
            raise WorkflowError(f"{where}: '{name}' = {value!r} is not one of the options ({shown})")
        return value
    if type_ == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise WorkflowError(f"{where}: '{name}' must be an integer, got {value!r}")
        value = int(value)
    elif type_ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WorkflowError(f"{where}: '{name}' must be a number, got {value!r}")
    elif type_ == "STRING":
        if not isinstance(value, str):
            raise WorkflowError(f"{where}: '{name}' must be a string, got {value!r}")
    elif type_ == "BOOLEAN":
        if not isinstance(value, bool):
            raise WorkflowError(f"{where}: '{name}' must be true or false, got {value!r}")
    if type_ in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo:
            raise WorkflowError(f"{where}: '{name}' = {value} is below its minimum {lo}")
        if hi is not None and value > hi:
            raise WorkflowError(f"{where}: '{name}' = {value} is above its maximum {hi}")
    return value


# --------------------------------------------------------------------------------------------------
# conversion


def describe(node):
    title = node.get("title")
    text = f"node {node.get('id')} ({node.get('type')}"
    if title and title != node.get("type"):
        text += f' "{title}"'
    return text + ")"


def _links_table(workflow):
    table = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, dict):
            link = (raw.get("id"), raw.get("origin_id"), raw.get("origin_slot"), raw.get("target_id"),
                    raw.get("target_slot"), raw.get("type"))
        elif isinstance(raw, (list, tuple)) and len(raw) >= 6:
            link = tuple(raw[:6])
        else:
            raise WorkflowError(f"malformed link entry {raw!r}: expected [id, from_node, from_slot, to_node, to_slot, type]")
        table[link[0]] = link
    return table


def _refuse_unsupported(workflow):
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    if subgraphs:
        ids = {sg.get("id") for sg in subgraphs}
        users = [n for n in workflow.get("nodes", []) if n.get("type") in ids]
        where = f" ({', '.join(describe(n) for n in users)})" if users else ""
        raise WorkflowError(
            f"this workflow uses subgraphs{where}, which the headless runner does not support. Open it in "
            "ComfyUI, right-click each subgraph node and choose 'Unpack Subgraph', then save it again."
        )
    groups = (workflow.get("extra") or {}).get("groupNodes") or {}
    users = [n for n in workflow.get("nodes", []) if str(n.get("type", "")).startswith(("workflow>", "workflow/"))]
    if groups or users:
        names = ", ".join(describe(n) for n in users) or ", ".join(groups)
        raise WorkflowError(
            f"this workflow uses group nodes ({names}), which the headless runner does not support. Open it "
            "in ComfyUI, right-click each group node and choose 'Convert to nodes', then save it again."
        )


class _Graph:
    def __init__(self, workflow, object_info):
        if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
            raise WorkflowError("not a UI-format workflow: no 'nodes' list (an API-format prompt needs no conversion)")
        _refuse_unsupported(workflow)
        self.info = object_info
        self.links = _links_table(workflow)
        self.nodes = {}
        for node in workflow["nodes"]:
            if not isinstance(node, dict) or "id" not in node or "type" not in node:
                raise WorkflowError(f"malformed node entry (needs 'id' and 'type'): {str(node)[:200]}")
            if node["id"] in self.nodes:
                raise WorkflowError(f"two nodes share id {node['id']}")
            self.nodes[node["id"]] = node

    def link(self, link_id, consumer, input_name):
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"{describe(consumer)}: input '{input_name}' refers to link {link_id}, "
                                "which is not in the workflow's links list (the file is damaged)")
        origin = self.nodes.get(link[1])
        if origin is None:
            raise WorkflowError(f"{describe(consumer)}: input '{input_name}' is linked to node {link[1]}, "
                                "which does not exist in the workflow")
        return link, origin

    def resolve(self, link_id, consumer, input_name, want_type, seen=()):
        """Follow a link through Reroute/PrimitiveNode/bypassed nodes.

        Returns ("link", origin_node, slot) | ("value", value, primitive_node) | None (input dropped).
        """
        link, origin = self.link(link_id, consumer, input_name)
        if origin["id"] in seen:
            raise WorkflowError(f"{describe(consumer)}: input '{input_name}' goes round a loop of reroute/bypassed nodes")
        seen = seen + (origin["id"],)
        kind, mode, slot = origin["type"], origin.get("mode", 0), link[2]
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"{describe(origin)} has no value to give to {describe(consumer)} '{input_name}'")
            return ("value", values[0], origin)
        if kind == "Reroute":
            inputs = origin.get("inputs") or []
            if not inputs or inputs[0].get("link") is None:
                return None
            return self.resolve(inputs[0]["link"], consumer, input_name, want_type, seen)
        if kind in DROPPED_NODES:
            raise WorkflowError(f"{describe(consumer)}: input '{input_name}' is linked to a {kind}, which has no outputs")
        if mode == MODE_BYPASS:
            inputs = origin.get("inputs") or []
            order = ([slot] if isinstance(slot, int) and 0 <= slot < len(inputs) else []) + list(range(len(inputs)))
            for idx in order:
                if inputs[idx].get("type") == want_type:  # the frontend compares type strings exactly
                    if inputs[idx].get("link") is None:
                        return None
                    return self.resolve(inputs[idx]["link"], consumer, input_name, want_type, seen)
            return None
        return ("link", origin, slot)


def ui_to_api(workflow, object_info, *, validate=False, check_files=False):
    """Convert a UI-format workflow dict to an API-format prompt dict (see module docstring)."""
    workflow = load_workflow(workflow)
    graph = _Graph(workflow, object_info)
    prompt = {}
    dropped_from = {}  # (node_id, input) -> why the input was dropped
    for node in sorted(graph.nodes.values(), key=lambda n: (n.get("order", 0), str(n["id"]))):
        kind, mode = node["type"], node.get("mode", 0)
        if kind in VIRTUAL_NODES or mode in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(
                f"{describe(node)}: node type '{kind}' is not installed in this ComfyUI. Install the "
                "custom-node pack that provides it (ComfyUI-Manager: 'Install Missing Custom Nodes'), or remove the node."
            )
        where = describe(node)
        inputs = {}
        # widget values, positional
        layout = widget_layout(info)
        raw = node.get("widgets_values")
        if raw is None:
            raw = []
        if isinstance(raw, dict):
            pairs = [(name, raw[name]) for name in layout if name is not FRONTEND_ONLY and name in raw]
        elif isinstance(raw, list):
            if len(raw) != len(layout):
                names = [n if n is not FRONTEND_ONLY else "<control/upload>" for n in layout]
                raise WorkflowError(
                    f"{where}: widgets_values has {len(raw)} values but this ComfyUI's {kind} has "
                    f"{len(layout)} widget slots ({', '.join(names) or 'none'}). The workflow was saved with a "
                    "different version of the node; open and re-save it in this ComfyUI."
                )
            pairs = [(name, value) for name, value in zip(layout, raw) if name is not FRONTEND_ONLY]
        else:
            raise WorkflowError(f"{where}: widgets_values must be a list, got {type(raw).__name__}")
        for name, value in pairs:
            type_, opts, _ = input_spec(info, name)
            inputs[name] = check_value(where, name, type_, opts, value, check_files) if validate else value
        # links
        for slot in node.get("inputs") or []:
            name = (slot.get("widget") or {}).get("name") or slot.get("name")
            link_id = slot.get("link")
            if link_id is None:
                continue
            spec = input_spec(info, name)
            if spec is None:
                raise WorkflowError(f"{where}: has a link into input '{name}', which this ComfyUI's {kind} does not have")
            type_, opts, _ = spec
            want = slot.get("type") or (type_ if isinstance(type_, str) else "COMBO")
            target = graph.resolve(link_id, node, name, want)
            if target is None:
                inputs.pop(name, None)
                dropped_from[(node["id"], name)] = "its source is a bypassed or unconnected node"
                continue
            if target[0] == "value":
                value = target[1]
                inputs[name] = check_value(where, name, type_, opts, value, check_files) if validate else value
                continue
            _, origin, out_slot = target
            if origin.get("mode", 0) == MODE_MUTED:
                inputs.pop(name, None)
                dropped_from[(node["id"], name)] = f"it comes from {describe(origin)}, which is muted"
                continue
            origin_info = object_info.get(origin["type"])
            if origin_info is None:
                raise WorkflowError(
                    f"{describe(origin)}: node type '{origin['type']}' is not installed in this ComfyUI. "
                    "Install the custom-node pack that provides it, or remove the node."
                )
            outputs = origin_info.get("output", [])
            if not isinstance(out_slot, int) or not 0 <= out_slot < len(outputs):
                raise WorkflowError(f"{where}: input '{name}' is linked to output {out_slot} of "
                                    f"{describe(origin)}, which has only {len(outputs)} outputs")
            if not types_match(outputs[out_slot], type_):
                raise WorkflowError(
                    f"{where}: input '{name}' expects {type_ if isinstance(type_, str) else 'a COMBO'} but is "
                    f"linked to output {out_slot} ({outputs[out_slot]}) of {describe(origin)}"
                )
            inputs[name] = [str(origin["id"]), out_slot]
        # required inputs present?
        for sec_name in ordered_inputs(info):
            type_, opts, required = input_spec(info, sec_name)
            if required and sec_name not in inputs:
                why = dropped_from.get((node["id"], sec_name))
                kind_word = "is not connected" if not is_widget(type_, opts) else "has no value"
                raise WorkflowError(f"{where}: required input '{sec_name}' {kind_word}"
                                    + (f" ({why})" if why else ""))
        prompt[str(node["id"])] = {
            "class_type": kind,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or kind},
        }
    if not prompt:
        raise WorkflowError("the workflow has no runnable nodes")
    if not any(object_info[p["class_type"]].get("output_node") for p in prompt.values()):
        raise WorkflowError("the workflow has no output node (e.g. SaveImage or PreviewImage): nothing would run")
    return prompt


# --------------------------------------------------------------------------------------------------
# overrides


def parse_override(text):
    """'NODE.input=value' -> (node, input, value); value is JSON when it parses, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise WorkflowError(f"--set {text!r}: expected NODE.input=value (NODE is a node id or title)")
    target, raw = text.split("=", 1)
    node, name = target.rsplit(".", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return node.strip(), name.strip(), value


def apply_overrides(prompt, overrides, object_info, validate=True):
    """Set API-prompt inputs. ``overrides``: {"<node id or title>.<input>": value} or a list of
    'NODE.input=value' strings, or (node, input, value) triples. Returns the prompt (modified)."""
    items = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            node, _, name = str(key).rpartition(".")
            items.append((node, name, value))
    else:
        for item in overrides or []:
            items.append(parse_override(item) if isinstance(item, str) else tuple(item))
    for node, name, value in items:
        ids = [k for k, v in prompt.items() if k == str(node)] or [
            k for k, v in prompt.items() if v.get("_meta", {}).get("title") == node or v["class_type"] == node]
        if not ids:
            raise WorkflowError(f"override {node}.{name}: no node with id or title {node!r} in the workflow")
        for node_id in ids:
            entry = prompt[node_id]
            info = object_info[entry["class_type"]]
            spec = input_spec(info, name)
            if spec is None:
                names = ", ".join(ordered_inputs(info))
                raise WorkflowError(f"override {node}.{name}: node {node_id} ({entry['class_type']}) has no input "
                                    f"'{name}' (inputs: {names})")
            type_, opts, _ = spec
            where = f"override for node {node_id} ({entry['class_type']})"
            entry["inputs"][name] = check_value(where, name, type_, opts, value) if validate else value
    return prompt
