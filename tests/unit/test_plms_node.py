"""PLMS node and sampler-name registration, without ComfyUI (fake comfy modules stand in)."""
import sys
import types

import pytest
import torch


@pytest.fixture
def plms_node(pack):
    return sys.modules["atelier.nodes.plms"]


def fake_comfy(monkeypatch, names=("euler", "ipndm"), **k_attrs):
    """Fake comfy.samplers / comfy.k_diffusion.sampling shaped like ComfyUI 0.15.1's (shared list objects)."""
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSAMPLER_NAMES = list(names)
    samplers.SAMPLER_NAMES = samplers.KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
    samplers.KSampler = type("KSampler", (), {"SAMPLERS": samplers.SAMPLER_NAMES})

    class KSAMPLER:
        def __init__(self, fn, extra_options={}, inpaint_options={}):
            self.sampler_function, self.extra_options = fn, extra_options

    samplers.KSAMPLER = KSAMPLER
    sampling = types.ModuleType("comfy.k_diffusion.sampling")
    for key, value in k_attrs.items():
        setattr(sampling, key, value)
    comfy = types.ModuleType("comfy")
    comfy.samplers = samplers
    k_diffusion = types.ModuleType("comfy.k_diffusion")
    k_diffusion.sampling = sampling
    comfy.k_diffusion = k_diffusion
    for name, mod in [("comfy", comfy), ("comfy.samplers", samplers), ("comfy.k_diffusion", k_diffusion),
                      ("comfy.k_diffusion.sampling", sampling)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return samplers, sampling


def test_node_is_gathered_with_a_complete_schema(pack):
    cls = pack.NODE_CLASS_MAPPINGS["AtelierPLMSSampler"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["AtelierPLMSSampler"]
    assert cls.RETURN_TYPES == ("SAMPLER",) and len(cls.OUTPUT_TOOLTIPS) == 1 and cls.CATEGORY.startswith("atelier/")
    inputs = cls.INPUT_TYPES()["required"]
    assert set(inputs) == {"order", "first_step", "eta"}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert inputs["first_step"][1]["default"] in inputs["first_step"][0]
    for name in ("order", "eta"):
        opts = inputs[name][1]
        assert opts["min"] <= opts["default"] <= opts["max"]


def test_registration_is_a_no_op_without_comfyui(plms_node, monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy.samplers", raising=False)
    assert plms_node.register_sampler_name() is False
    assert "comfy.samplers" not in sys.modules


def test_registration_adds_plms_once_to_every_list(plms_node, monkeypatch):
    samplers, sampling = fake_comfy(monkeypatch)
    for _ in range(3):
        assert plms_node.register_sampler_name() is True
    assert samplers.KSAMPLER_NAMES.count("plms") == 1
    assert samplers.SAMPLER_NAMES.count("plms") == 1
    assert samplers.KSampler.SAMPLERS is samplers.SAMPLER_NAMES  # still the list the node schemas hold
    assert samplers.KSAMPLER_NAMES[:2] == ["euler", "ipndm"]  # existing names untouched, order kept
    assert sampling.sample_plms is plms_node.comfy_sample_plms  # what ksampler("plms") resolves


def test_registration_keeps_an_existing_sample_plms(plms_node, monkeypatch):
    def theirs(*args, **kwargs):
        return None

    samplers, sampling = fake_comfy(monkeypatch, names=("euler", "plms"), sample_plms=theirs)
    plms_node.register_sampler_name()
    assert sampling.sample_plms is theirs
    assert samplers.KSAMPLER_NAMES == ["euler", "plms"] and samplers.SAMPLER_NAMES.count("plms") == 1


def test_separate_ksampler_list_is_also_extended(plms_node, monkeypatch):
    samplers, _ = fake_comfy(monkeypatch)
    samplers.KSampler.SAMPLERS = list(samplers.SAMPLER_NAMES)  # a copy, not the same object
    plms_node.register_sampler_name()
    assert samplers.KSampler.SAMPLERS.count("plms") == 1 and samplers.SAMPLER_NAMES.count("plms") == 1


def test_node_returns_ksampler_with_options(plms_node, monkeypatch):
    fake_comfy(monkeypatch)
    (sampler,) = plms_node.AtelierPLMSSampler().get_sampler(order=3, first_step="euler", eta=0.25)
    assert sampler.sampler_function is plms_node.comfy_sample_plms
    assert sampler.extra_options == {"order": 3, "first_step": "euler", "eta": 0.25}


def test_adapter_seeds_noise_from_extra_args(plms_node, monkeypatch):
    seeds = []

    def default_noise_sampler(x, seed=None):
        seeds.append(seed)
        gen = torch.Generator().manual_seed(seed)
        return lambda s, s_next: torch.randn(x.shape, generator=gen)

    fake_comfy(monkeypatch, default_noise_sampler=default_noise_sampler)
    model = lambda x, sigma, **kw: x / (1 + sigma.view(-1, 1) ** 2)  # noqa: E731
    x, sigmas = torch.randn(2, 4), torch.tensor([5.0, 2.0, 1.0, 0.0])
    a = plms_node.comfy_sample_plms(model, x, sigmas, extra_args={"seed": 7}, eta=0.5, disable=True)
    b = plms_node.comfy_sample_plms(model, x, sigmas, extra_args={"seed": 7}, eta=0.5, disable=True)
    c = plms_node.comfy_sample_plms(model, x, sigmas, extra_args={"seed": 8}, eta=0.5, disable=True)
    assert seeds == [7, 7, 8] and torch.equal(a, b) and not torch.equal(a, c)
    plms_node.comfy_sample_plms(model, x, sigmas, extra_args={"seed": 9}, disable=True)
    assert seeds == [7, 7, 8]  # eta = 0 builds no noise sampler
