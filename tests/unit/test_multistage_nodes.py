"""The multistage nodes without ComfyUI: schemas, stage list, and the node path with a SIGMAS input.

``node_helpers`` is replaced by a stand-in with ComfyUI's documented semantics (copy each entry's dict,
set the values); the model is a stand-in whose ``percent_to_sigma`` is SD1.5's (see test_multistage).
"""
import sys
import types

import pytest
import torch

from test_multistage import MODEL, gate, karras


@pytest.fixture
def mod(pack, monkeypatch):
    helpers = types.ModuleType("node_helpers")

    def conditioning_set_values(conditioning, values={}, append=False):
        return [[t[0], {**t[1], **values}] for t in conditioning]

    helpers.conditioning_set_values = conditioning_set_values
    monkeypatch.setitem(sys.modules, "node_helpers", helpers)
    return sys.modules["atelier.nodes.multistage"]


class FakeModel:
    def get_model_object(self, name):
        assert name == "model_sampling"
        return MODEL


class FakeClip:
    def __init__(self):
        self.encoded = []

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens)
        return [[torch.full((1, 1, 4), float(len(self.encoded))), {"text": tokens}]]


def cond(v):
    return [[torch.full((1, 1, 4), float(v)), {"pooled_output": None}]]


def stages_seen(conditioning, sig):
    """Which entries ComfyUI's gating would use at each step (by their 'text' or value)."""
    seen = []
    for s in sig[:-1]:
        active = []
        for t, d in conditioning:
            start = MODEL.percent_to_sigma(d["start_percent"])
            end = MODEL.percent_to_sigma(d["end_percent"])
            if not (torch.tensor(s) > start or torch.tensor(s) < end):
                active.append(d.get("text", float(t.flatten()[0])))
        seen.append(active)
    return seen


def test_schemas_have_tooltips_and_valid_defaults(mod):
    for name, cls in mod.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("Atelier") and cls.CATEGORY.startswith("atelier/")
        assert name in mod.NODE_DISPLAY_NAME_MAPPINGS
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, (typ, opts) in spec.get(section, {}).items():
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
                if isinstance(typ, list):
                    assert opts["default"] in typ
                if "min" in opts:
                    assert opts["min"] <= opts["default"] <= opts["max"]


def test_text_mode_with_sigmas_input(mod):
    sig = torch.tensor(karras(20, MODEL.sigma_min, MODEL.sigma_max))
    clip = FakeClip()
    node = mod.AtelierMultistageConditioning()
    out = node.apply(clip, FakeModel(), "8: A Chinese dragon\n12: A fish", "euler", "karras", 20, 1.0,
                     sigmas=sig)
    positive, table = out["result"]
    assert out["ui"]["text"] == [table]
    assert clip.encoded == ["A Chinese dragon", "A fish"]
    assert stages_seen(positive, sig.tolist()) == [["A Chinese dragon"]] * 8 + [["A fish"]] * 12
    assert "custom SIGMAS" in table and "A Chinese dragon" in table


def test_text_mode_errors(mod):
    sig = torch.tensor(karras(20, MODEL.sigma_min, MODEL.sigma_max))
    node = mod.AtelierMultistageConditioning()
    with pytest.raises(ValueError, match="sum to 19"):
        node.apply(FakeClip(), FakeModel(), "8: a\n11: b", "euler", "karras", 20, 1.0, sigmas=sig)
    with pytest.raises(ValueError, match="empty"):
        node.apply(FakeClip(), FakeModel(), "8: a\n12:", "euler", "karras", 20, 1.0, sigmas=sig)
    with pytest.raises(ValueError, match="CLIP"):
        node.apply(None, FakeModel(), "20: a", "euler", "karras", 20, 1.0, sigmas=sig)
    out = node.apply(FakeClip(), FakeModel(), "2: a\n3: b", "euler", "karras", 20, 1.0, scale_steps=True,
                     sigmas=sig)
    assert "scaled from [2, 3] to [8, 12]" in out["result"][1]


def test_stage_list_chain_and_inputs_untouched(mod):
    c1, c2, c3 = cond(1), cond(2), cond(3)
    first = mod.AtelierStageList().collect(c1, 4, 6, 0, 0, conditioning_2=c2)[0]
    both = mod.AtelierStageList().collect(c3, 10, previous=first)[0]
    assert [(s[1]) for s in both] == [4, 6, 10]
    sig = torch.tensor(karras(20, MODEL.sigma_min, MODEL.sigma_max))
    out = mod.AtelierMultistageFromStages().apply(FakeModel(), both, "euler", "karras", 20, 1.0, sigmas=sig)
    positive = out["result"][0]
    assert stages_seen(positive, sig.tolist()) == [[1.0]] * 4 + [[2.0]] * 6 + [[3.0]] * 10
    assert c1[0][1] == {"pooled_output": None}  # the input dicts were not mutated
    with pytest.raises(ValueError, match="not connected"):
        mod.AtelierStageList().collect(c1, 4, 6)


def test_stage_with_existing_range_is_refused(mod):
    ranged = [[torch.zeros(1, 1, 4), {"start_percent": 0.2, "end_percent": 1.0}]]
    stages = ((ranged, 20, "stage 1"),)
    sig = torch.tensor(karras(20, MODEL.sigma_min, MODEL.sigma_max))
    with pytest.raises(ValueError, match="already has a timestep range"):
        mod.AtelierMultistageFromStages().apply(FakeModel(), stages, "euler", "karras", 20, 1.0, sigmas=sig)


def test_prompt_editing_node(mod):
    sig = torch.tensor(karras(20, MODEL.sigma_min, MODEL.sigma_max))
    clip = FakeClip()
    out = mod.AtelierPromptEditing().apply(clip, FakeModel(), "[A Chinese dragon:A fish:8]", "euler", "karras",
                                           20, 1.0, counting="exact", sigmas=sig)
    assert stages_seen(out["result"][0], sig.tolist()) == [["A Chinese dragon"]] * 8 + [["A fish"]] * 12
    clip = FakeClip()
    out = mod.AtelierPromptEditing().apply(clip, FakeModel(), "[x|y] cat", "euler", "karras", 20, 1.0,
                                           counting="exact", sigmas=sig)
    assert clip.encoded == ["x cat", "y cat"]  # each distinct prompt is encoded once
    assert [s[0] for s in stages_seen(out["result"][0], sig.tolist())] == ["x cat", "y cat"] * 10


def test_gate_helper_agrees(mod):
    # sanity: the helper used above is ComfyUI's rule (same as test_multistage.gate)
    from atelier.samplers import multistage as ms

    sig = karras(5, MODEL.sigma_min, MODEL.sigma_max)
    plan = ms.plan_stages(sig, [2, 3], MODEL.percent_to_sigma)
    assert [gate(plan, s) for s in sig[:-1]] == [[0], [0], [1], [1], [1]]
