"""Multistage conditioning inside a real ComfyUI: every step is guided by exactly its planned stage.

Thousands of sampling runs, so not through HTTP: ``python -m bench.bench_multistage`` runs in a subprocess
with ComfyUI's python, samples in-process with ``comfy.sample.sample`` on a tiny SD1.5-shaped model whose UNet
call is a recording wrapper (returns zeros), and writes its figures as JSON. The plan comes from the pack's
own node (``AtelierMultistageFromStages``), so node + core + ComfyUI's gating are tested together.
The last test goes through the shared server fixture instead: text and prompt-editing nodes with a real
(tiny) CLIP, their UI text, and an error message naming the node.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from atelier.runner.server import find_comfyui, find_python

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLERS = "euler,ipndm,dpmpp_2m,plms"
PLMS_IN_PACK = (ROOT / "nodes" / "plms.py").exists()

pytestmark = pytest.mark.host


def run_harness(tmp_path, name, *args, timeout=1800):
    comfy = find_comfyui()
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, COMFYUI_PATH=str(comfy), ATELIER_FORCE_CPU="1")
    proc = subprocess.run([find_python(comfy), "-m", "bench.bench_multistage", "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(proc.stdout)
    assert out.exists(), f"harness failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def check_common(fig):
    assert fig["errors"] == [], "\n".join(fig["errors"][:20])
    assert fig["steps_checked"] > 0 and fig["exact_fraction"] == 1.0
    assert fig["extra_calls"] == 0 and fig["call_comparisons"] > 0
    if PLMS_IN_PACK:
        assert "plms" in fig["samplers"], "nodes/plms.py exists but `plms` was not registered in ComfyUI"


def test_every_scheduler_every_step_count_1_to_60(tmp_path):
    """All of ComfyUI's schedulers x steps 1..60 x euler/ipndm/dpmpp_2m(/plms) x denoise 1.0 and 0.6."""
    fig = run_harness(tmp_path, "matrix", "--steps", "1-60", "--samplers", SAMPLERS, "--denoise", "1.0,0.6",
                      "--cfg", "1.0", "--extra-calls-every", "6")
    check_common(fig)
    assert fig["steps"] == [1, 60] and fig["denoise"] == [1.0, 0.6]
    assert set(fig["per_scheduler"]) == set(fig["schedulers"]) and len(fig["schedulers"]) >= 9
    runs = len(fig["samplers"]) * len(fig["schedulers"]) * 2 * 60
    assert fig["runs"] + fig["nan_schedules_refused"] == runs
    print(f"\nmultistage host check: {fig['steps_checked']} steps checked in {fig['runs']} runs "
          f"({', '.join(fig['samplers'])}), all exact; 0 extra model calls")


def test_negative_windows_custom_sigmas_and_between_step_evaluations(tmp_path):
    """cfg > 1 (the negative must be seen at every evaluation), KSamplerAdvanced windows, SamplerCustom
    with a SIGMAS input, and what heun / dpm_2 see between steps."""
    fig = run_harness(tmp_path, "extras", "--steps", "1,2,3,5,8,13,20,33,60", "--samplers", SAMPLERS,
                      "--denoise", "1.0,0.6", "--cfg", "4.0", "--extras")
    check_common(fig)
    ex = fig["extras"]
    assert ex["advanced_windows"] > 0 and ex["custom_runs"] > 0
    dpm2 = ex["intermediate"]["dpm_2"]
    assert dpm2["between_steps"] > 0 and dpm2["between_own_stage"] == dpm2["between_steps"]
    heun = ex["intermediate"]["heun"]
    assert heun["at_next_sigma_next_stage"] > 0


def _preview(prompt, node, slot=1):
    key = str(len(prompt) + 1)
    prompt[key] = {"class_type": "PreviewAny", "inputs": {"source": [node, slot]}}
    return key


def test_text_and_prompt_editing_nodes_with_a_real_clip(comfy_server):
    """Through the server: real CLIP encoding, the UI text, and a readable error naming the node."""
    from atelier.runner.run import RunError

    common = {"model": ["1", 0], "clip": ["1", 1], "sampler_name": "euler", "scheduler": "karras", "steps": 20,
              "denoise": 1.0}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "AtelierPromptEditing",
              "inputs": dict(common, text="[A Chinese dragon:A fish:8], ink", counting="exact")},
        "3": {"class_type": "AtelierMultistageConditioning",
              "inputs": dict(common, stages="8: A Chinese dragon\n0: a cat\n12: A fish", scale_steps=False)},
    }
    _preview(prompt, "2")
    _preview(prompt, "3")
    result = comfy_server.run_api(prompt, timeout=900)
    assert result.status == "success"
    for node in ("2", "3"):
        table = result.outputs[node]["text"][0]
        rows = [line.split() for line in table.splitlines()[2:5]]
        assert "A Chinese dragon" in table and "A fish" in table
        assert [r[1] for r in rows if r and r[0].isdigit()][:2] == ["8", "0" if node == "3" else "12"]
    bad = {"1": prompt["1"], "2": {"class_type": "AtelierMultistageConditioning",
                                   "inputs": dict(common, stages="3: a\n4: b", scale_steps=False)}}
    _preview(bad, "2")
    with pytest.raises(RunError, match="sum to 7"):
        comfy_server.run_api(bad, timeout=900)
