"""The Prompt Extender in a real ComfyUI: the example workflow with the bundled knowledge base and LM "none",
then with a tiny random GPT-2 dropped into models/prompt_expansion."""
import pathlib

import pytest

from atelier.runner import convert

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "prompt_extension.json"
USER_PROMPT = "a painting of urbanization of china"

pytestmark = pytest.mark.host


def small(prompt, candidates=3, **extender):
    """64x64, 2 steps, and the extender's settings overridden."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=1)
        if entry["class_type"] == "KSampler":
            inputs["steps"] = 2
        if entry["class_type"] == "AtelierPromptExtender":
            inputs["candidates"] = candidates
            inputs.update(extender)
    return prompt


def extender_id(prompt):
    return next(k for k, v in prompt.items() if v["class_type"] == "AtelierPromptExtender")


def report_of(result, prompt):
    node = next(k for k, v in prompt.items() if v["class_type"] == "PreviewAny")
    return "".join(result.outputs[node]["text"])


def test_workflow_bundled_base_retrieval_only(comfy_server):
    prompt = small(convert.ui_to_api(convert.load_workflow(WORKFLOW), comfy_server.object_info(), validate=True))
    assert prompt[extender_id(prompt)]["inputs"]["language_model"] == "none"
    result = comfy_server.run_api(prompt, timeout=900)
    assert result.status == "success"
    pngs = [p for p in result.files if p.suffix == ".png"]
    assert len(pngs) == 3, "one image per extended prompt (the list output fans out)"
    report = report_of(result, prompt)
    assert "language model: none (retrieval only)" in report and "w(v)" in report
    assert report.count(USER_PROMPT + ", ") >= 3
    assert result.outputs[extender_id(prompt)]["text"][0] == report  # also shown on the node itself


def test_workflow_with_tiny_gpt2_and_switched_off(comfy_server):
    from atelier.tests.fixtures.tiny_lm import make_tiny_gpt2

    make_tiny_gpt2(str(comfy_server.base_dir / "models" / "prompt_expansion" / "tiny-gpt2"))
    info = comfy_server.object_info(refresh=True)
    assert "tiny-gpt2" in info["AtelierPromptExtender"]["input"]["required"]["language_model"][0]
    prompt = small(convert.ui_to_api(convert.load_workflow(WORKFLOW), info, validate=True), candidates=2,
                   language_model="tiny-gpt2", seed=5)
    result = comfy_server.run_api(prompt, timeout=900)
    report = report_of(result, prompt)
    assert "language model: tiny-gpt2 (causal)" in report and "WARNING" not in report
    assert len([p for p in result.files if p.suffix == ".png"]) == 2

    prompt = small(convert.ui_to_api(convert.load_workflow(WORKFLOW), info, validate=True), enabled=False)
    result = comfy_server.run_api(prompt, timeout=900)
    assert "switched off" in report_of(result, prompt)
    assert len([p for p in result.files if p.suffix == ".png"]) == 1
