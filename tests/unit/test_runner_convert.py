"""UI -> API conversion (runner/convert.py) on hand-made workflows, checked against the frontend's rules."""
import json

import pytest

from atelier.runner import convert
from atelier.runner.convert import WorkflowError, ui_to_api

SEED = ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}]
INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP", "VAE"], "output_node": False},
    "Encode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
               "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"], "output_node": False},
    "Sampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": SEED, "steps": ["INT", {"default": 20, "min": 1, "max": 100}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
        "sampler_name": [["euler", "ddim"], {}], "positive": ["CONDITIONING", {}]},
        "optional": {"denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}],
                     "extra": ["LATENT", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "positive"],
                        "optional": ["denoise", "extra"]},
        "output": ["LATENT"], "output_node": False},
    "Filter": {"input": {"required": {"latent": ["LATENT", {}], "model": ["MODEL", {}],
                                      "strength": ["FLOAT", {"default": 1.0}]}},
               "input_order": {"required": ["latent", "model", "strength"]},
               "output": ["MODEL", "LATENT"], "output_node": False},
    "Save": {"input": {"required": {"samples": ["LATENT", {}], "prefix": ["STRING", {}]}},
             "input_order": {"required": ["samples", "prefix"]}, "output": [], "output_node": True},
    "Seeded": {"input": {"required": {"seed": ["INT", {"control_after_generate": False}],
                                      "noise_seed": ["INT", {}], "other": ["INT", {}],
                                      "pick": ["COMBO", {"options": ["x", "y"], "control_after_generate": True}],
                                      "image": [["p.png"], {"image_upload": True}],
                                      },
                         "optional": {"forced": ["INT", {"forceInput": True}]}},
               "output": ["INT"], "output_node": True},
}


def node(id_, type_, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    n = {"id": id_, "type": type_, "pos": [0, 0], "size": [100, 50], "flags": {}, "order": id_, "mode": mode,
         "inputs": [dict(name=name, type=t, link=link, **({"widget": {"name": name}} if widget else {}))
                    for name, t, link, widget in [(*i, False) if len(i) == 3 else i for i in inputs]],
         "outputs": [{"name": t, "type": t, "links": links} for t, links in outputs],
         "properties": {}}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def base_workflow():
    """Loader -> Encode -> Sampler -> Save, the way the frontend saves it."""
    nodes = [
        node(1, "Loader", outputs=[("MODEL", [1]), ("CLIP", [2]), ("VAE", [])], widgets=["a.safetensors"]),
        node(2, "Encode", inputs=[("clip", "CLIP", 2)], outputs=[("CONDITIONING", [3])], widgets=["a cat"]),
        node(3, "Sampler", inputs=[("model", "MODEL", 1), ("positive", "CONDITIONING", 3)],
             outputs=[("LATENT", [4])], widgets=[42, "randomize", 10, 6.5, "ddim", 0.75]),
        node(4, "Save", inputs=[("samples", "LATENT", 4)], widgets=["out"]),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 2, 0, 3, 1, "CONDITIONING"],
             [4, 3, 0, 4, 0, "LATENT"]]
    return {"last_node_id": 4, "last_link_id": 4, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_basic_conversion_skips_control_after_generate_value():
    api = ui_to_api(base_workflow(), INFO, validate=True)
    assert api["3"]["inputs"] == {"model": ["1", 0], "seed": 42, "steps": 10, "cfg": 6.5,
                                  "sampler_name": "ddim", "denoise": 0.75, "positive": ["2", 0]}
    assert api["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"},
                        "_meta": {"title": "Loader"}}
    assert api["2"]["inputs"] == {"text": "a cat", "clip": ["1", 1]}
    assert set(api) == {"1", "2", "3", "4"}


def test_widget_layout_follows_frontend_rules():
    layout = convert.widget_layout(INFO["Seeded"])
    extra = convert.FRONTEND_ONLY
    # seed: control explicitly off; noise_seed: legacy name rule; pick: combo control + filter; image: upload
    assert layout == ["seed", "noise_seed", extra, "other", "pick", extra, extra, "image", extra]


def test_widget_layout_dict_order_without_input_order():
    info = {"input": {"required": {"b": ["INT", {}], "a": ["STRING", {}]}}, "output": [], "output_node": True}
    assert convert.widget_layout(info) == ["b", "a"]


def test_converted_widget_takes_the_link_and_keeps_positions():
    wf = base_workflow()
    # Sampler.steps converted to an input and fed by node 12's INT output; its stale value stays in widgets_values
    wf["nodes"][2]["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 12})
    wf["nodes"].append(node(12, "Seeded", outputs=[("INT", [12])],
                            widgets=[1, 2, "fixed", 3, "x", "fixed", "", "p.png", "image"]))
    wf["links"].append([12, 12, 0, 3, 6, "INT"])
    api = ui_to_api(wf, INFO, validate=True)
    assert api["3"]["inputs"]["steps"] == ["12", 0]
    assert api["3"]["inputs"]["cfg"] == 6.5 and api["3"]["inputs"]["sampler_name"] == "ddim"
    assert api["12"]["inputs"] == {"seed": 1, "noise_seed": 2, "other": 3, "pick": "x", "image": "p.png"}


def test_primitive_node_value_reaches_its_targets():
    wf = base_workflow()
    wf["nodes"][2]["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 9})
    wf["nodes"].append(node(9, "PrimitiveNode", outputs=[("INT", [9])], widgets=[33, "fixed"]))
    wf["links"].append([9, 9, 0, 3, 6, "INT"])
    api = ui_to_api(wf, INFO, validate=True)
    assert api["3"]["inputs"]["steps"] == 33  # not the stale 10 still in the target's widgets_values
    assert "9" not in api


def test_primitive_value_is_validated_against_the_target():
    wf = base_workflow()
    wf["nodes"][2]["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 9})
    wf["nodes"].append(node(9, "PrimitiveNode", outputs=[("INT", [9])], widgets=[500, "fixed"]))
    wf["links"].append([9, 9, 0, 3, 6, "INT"])
    with pytest.raises(WorkflowError, match=r"node 3 \(Sampler\): 'steps' = 500 is above its maximum 100"):
        ui_to_api(wf, INFO, validate=True)


def test_reroute_chain_is_followed():
    wf = base_workflow()
    # Loader.MODEL -> Reroute 10 -> Reroute 11 -> Sampler.model
    wf["links"][0] = [1, 1, 0, 10, 0, "MODEL"]
    wf["links"] += [[10, 10, 0, 11, 0, "*"], [11, 11, 0, 3, 0, "MODEL"]]
    wf["nodes"][2]["inputs"][0]["link"] = 11
    wf["nodes"] += [node(10, "Reroute", inputs=[("", "*", 1)], outputs=[("*", [10])]),
                    node(11, "Reroute", inputs=[("", "*", 10)], outputs=[("*", [11])])]
    api = ui_to_api(wf, INFO, validate=True)
    assert api["3"]["inputs"]["model"] == ["1", 0]
    assert "10" not in api and "11" not in api


def test_notes_are_dropped():
    wf = base_workflow()
    wf["nodes"] += [node(20, "Note", widgets=["hello"]), node(21, "MarkdownNote", widgets=["# hi"])]
    api = ui_to_api(wf, INFO, validate=True)
    assert set(api) == {"1", "2", "3", "4"}


def _with_filter(mode):
    """Loader.MODEL -> Filter(model) ; Sampler.LATENT -> Filter(latent) ; Filter outputs -> Save / Sampler2."""
    wf = base_workflow()
    wf["nodes"].append(node(6, "Filter", inputs=[("latent", "LATENT", 7), ("model", "MODEL", 8)],
                            outputs=[("MODEL", [10]), ("LATENT", [9])], widgets=[0.5], mode=mode))
    wf["nodes"].append(node(7, "Save", inputs=[("samples", "LATENT", 9)], widgets=["second"]))
    wf["nodes"].append(node(8, "Sampler", inputs=[("model", "MODEL", 10), ("positive", "CONDITIONING", 11)],
                            outputs=[("LATENT", [])], widgets=[1, "fixed", 2, 1.0, "euler", 1.0]))
    wf["links"] += [[7, 3, 0, 6, 0, "LATENT"], [8, 1, 0, 6, 1, "MODEL"], [9, 6, 1, 7, 0, "LATENT"],
                    [10, 6, 0, 8, 0, "MODEL"], [11, 2, 0, 8, 5, "CONDITIONING"]]
    return wf


def test_bypassed_node_passes_matching_types_through():
    api = ui_to_api(_with_filter(mode=4), INFO, validate=True)
    assert "6" not in api
    # Filter output 1 (LATENT): input slot 1 is MODEL, so the first LATENT input (slot 0) is used
    assert api["7"]["inputs"]["samples"] == ["3", 0]
    # Filter output 0 (MODEL): slot 0 is LATENT, so the first MODEL input (slot 1) is used
    assert api["8"]["inputs"]["model"] == ["1", 0]


def test_bypass_prefers_the_input_at_the_same_slot():
    wf = _with_filter(mode=4)
    # a second LATENT input at slot 1 would win for output slot 1; make Filter inputs [LATENT, LATENT]
    wf["nodes"][4]["inputs"] = [{"name": "latent", "type": "LATENT", "link": 7},
                                {"name": "model", "type": "LATENT", "link": 12}]
    wf["links"].append([12, 5, 0, 6, 1, "LATENT"])
    wf["nodes"].append(node(5, "Sampler", inputs=[("model", "MODEL", 13), ("positive", "CONDITIONING", 14)],
                            outputs=[("LATENT", [12])], widgets=[1, "fixed", 2, 1.0, "euler", 1.0]))
    wf["links"] += [[13, 1, 0, 5, 0, "MODEL"], [14, 2, 0, 5, 5, "CONDITIONING"]]
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] != 8]
    wf["links"] = [link for link in wf["links"] if link[3] != 8]
    api = ui_to_api(wf, INFO, validate=True)
    assert api["7"]["inputs"]["samples"] == ["5", 0]  # output slot 1 -> input slot 1


def test_muted_node_is_left_out_and_required_consumer_fails_clearly():
    with pytest.raises(WorkflowError, match=r"node 7 \(Save\): required input 'samples' is not connected .*muted"):
        ui_to_api(_with_filter(mode=2), INFO, validate=True)


def test_muted_node_feeding_an_optional_input_drops_it():
    wf = base_workflow()
    wf["nodes"].append(node(6, "Sampler", inputs=[("model", "MODEL", 20), ("positive", "CONDITIONING", 21)],
                            outputs=[("LATENT", [22])], widgets=[1, "fixed", 2, 1.0, "euler", 1.0], mode=2))
    wf["nodes"][2]["inputs"].append({"name": "extra", "type": "LATENT", "link": 22})
    wf["links"] += [[20, 1, 0, 6, 0, "MODEL"], [21, 2, 0, 6, 5, "CONDITIONING"], [22, 6, 0, 3, 2, "LATENT"]]
    api = ui_to_api(wf, INFO, validate=True)
    assert "6" not in api and "extra" not in api["3"]["inputs"]


def test_dict_widgets_values_are_matched_by_name():
    wf = base_workflow()
    wf["nodes"][3]["widgets_values"] = {"prefix": "named"}
    assert ui_to_api(wf, INFO)["4"]["inputs"]["prefix"] == "named"


@pytest.mark.parametrize("mutate, message", [
    (lambda wf: wf["nodes"].append(node(30, "FancyUpscaler", widgets=[])),
     r"node 30 \(FancyUpscaler\): node type 'FancyUpscaler' is not installed"),
    (lambda wf: wf["links"].__setitem__(0, [1, 99, 0, 3, 0, "MODEL"]),
     r"node 3 \(Sampler\): input 'model' is linked to node 99, which does not exist"),
    (lambda wf: wf["nodes"][2]["inputs"][0].__setitem__("link", 77),
     r"node 3 \(Sampler\): input 'model' refers to link 77, which is not in the workflow's links"),
    (lambda wf: wf["nodes"][2].__setitem__("widgets_values", ["42", "fixed", 10, 6.5, "ddim", 0.75]),
     r"node 3 \(Sampler\): 'seed' must be an integer, got '42'"),
    (lambda wf: wf["nodes"][2].__setitem__("widgets_values", [42, "fixed", 10, "high", "ddim", 0.75]),
     r"'cfg' must be a number"),
    (lambda wf: wf["nodes"][2].__setitem__("widgets_values", [42, "fixed", 10, 6.5, "plms2", 0.75]),
     r"'sampler_name' = 'plms2' is not one of the options \('euler', 'ddim'\)"),
    (lambda wf: wf["nodes"][2].__setitem__("widgets_values", [42, 10, 6.5, "ddim", 0.75]),
     r"node 3 \(Sampler\): widgets_values has 5 values but .* 6 widget slots \(seed, <control/upload>, steps"),
    (lambda wf: wf["nodes"][2].__setitem__("widgets_values", [42, "fixed", 0, 6.5, "ddim", 0.75]),
     r"'steps' = 0 is below its minimum 1"),
    (lambda wf: wf["nodes"][3].__setitem__("widgets_values", [True]), r"'prefix' must be a string"),
    (lambda wf: wf["links"].__setitem__(3, [4, 2, 0, 4, 0, "CONDITIONING"]),
     r"node 4 \(Save\): input 'samples' expects LATENT but is linked to output 0 \(CONDITIONING\) of node 2"),
    (lambda wf: wf["links"].__setitem__(3, [4, 3, 5, 4, 0, "LATENT"]),
     r"linked to output 5 of node 3 \(Sampler\), which has only 1 outputs"),
    (lambda wf: wf["nodes"].__delitem__(3), r"no output node"),
    (lambda wf: wf.__setitem__("definitions", {"subgraphs": [{"id": "abc-123"}]}) or wf["nodes"].append(
        node(40, "abc-123")), r"subgraphs \(node 40 \(abc-123\)\).*Unpack Subgraph"),
    (lambda wf: wf["extra"].__setitem__("groupNodes", {"mygroup": {}}) or wf["nodes"].append(
        node(41, "workflow>mygroup")), r"group nodes \(node 41 \(workflow>mygroup\)\)"),
    (lambda wf: wf["nodes"].append(node(1, "Save", widgets=["dup"])), r"two nodes share id 1"),
])
def test_bad_workflows_give_clear_errors(mutate, message):
    wf = base_workflow()
    mutate(wf)
    with pytest.raises(WorkflowError, match=message):
        ui_to_api(wf, INFO, validate=True)


def test_titles_appear_in_error_messages():
    wf = base_workflow()
    wf["nodes"][2]["title"] = "Main sampler"
    wf["nodes"][2]["widgets_values"][2] = 0
    with pytest.raises(WorkflowError, match=r'node 3 \(Sampler "Main sampler"\)'):
        ui_to_api(wf, INFO, validate=True)


def test_file_combos_are_not_checked_unless_asked():
    wf = base_workflow()
    wf["nodes"][0]["widgets_values"] = ["v1-5-pruned-emaonly.safetensors"]
    assert ui_to_api(wf, INFO, validate=True)["1"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    with pytest.raises(WorkflowError, match="is not one of the options"):
        ui_to_api(wf, INFO, validate=True, check_files=True)


def test_integral_float_is_accepted_for_int():
    wf = base_workflow()
    wf["nodes"][2]["widgets_values"][2] = 12.0
    api = ui_to_api(wf, INFO, validate=True)
    assert api["3"]["inputs"]["steps"] == 12 and isinstance(api["3"]["inputs"]["steps"], int)


def test_load_workflow_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [1, 2,,]}')
    with pytest.raises(WorkflowError, match="bad.json is not valid JSON"):
        convert.load_workflow(bad)
    with pytest.raises(WorkflowError, match="not found"):
        convert.load_workflow(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(WorkflowError, match="a workflow is a JSON object"):
        convert.load_workflow(tmp_path / "list.json")
    with pytest.raises(WorkflowError, match="no 'nodes' list"):
        ui_to_api({"1": {"class_type": "Save", "inputs": {}}}, INFO)


def test_api_format_detection():
    api = ui_to_api(base_workflow(), INFO)
    assert convert.is_api_format(api)
    assert not convert.is_api_format(base_workflow())
    assert convert.load_workflow(json.dumps(api)) == api


def test_overrides_by_id_title_and_class():
    api = ui_to_api(base_workflow(), INFO)
    api["2"]["_meta"]["title"] = "Positive"
    convert.apply_overrides(api, ["3.steps=4", "Positive.text=a dog", "Save.prefix=x"], INFO)
    assert api["3"]["inputs"]["steps"] == 4
    assert api["2"]["inputs"]["text"] == "a dog"
    assert api["4"]["inputs"]["prefix"] == "x"
    convert.apply_overrides(api, {"3.cfg": 2.5}, INFO)
    assert api["3"]["inputs"]["cfg"] == 2.5


@pytest.mark.parametrize("override, message", [
    ("3.stepz=4", r"node 3 \(Sampler\) has no input 'stepz' \(inputs: model, seed, steps"),
    ("99.steps=4", r"no node with id or title '99'"),
    ("3.steps=many", r"'steps' must be an integer, got 'many'"),
    ("steps=4", r"expected NODE.input=value"),
])
def test_bad_overrides(override, message):
    api = ui_to_api(base_workflow(), INFO)
    with pytest.raises(WorkflowError, match=message):
        convert.apply_overrides(api, [override], INFO)


def test_types_match_rules():
    assert convert.types_match("MODEL", "MODEL")
    assert convert.types_match("*", "MODEL") and convert.types_match("IMAGE", "*")
    assert convert.types_match("INT", "INT,FLOAT")
    assert not convert.types_match("IMAGE", "LATENT")
    assert convert.types_match(["a", "b"], ["a", "b"])  # combo output into combo input


def test_node_info_from_class_matches_object_info_shape():
    class Demo:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE", {"tooltip": "t"}), "k": ("INT", {"default": 3, "tooltip": "t"})},
                    "optional": {"mode": (["a", "b"], {"tooltip": "t"})}, "hidden": {"uid": "UNIQUE_ID"}}
        RETURN_TYPES = ("IMAGE",)
        RETURN_NAMES = ("out",)
        OUTPUT_NODE = True

    info = convert.node_info_from_class("AtelierDemo", Demo)
    assert info["input_order"] == {"required": ["image", "k"], "optional": ["mode"]}
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["out"] and info["output_node"] is True
    assert convert.widget_layout(info) == ["k", "mode"]
