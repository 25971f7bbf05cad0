"""Multistage conditioning inside a real ComfyUI: every step is guided by exactly its planned stage.

Thousands of sampling runs, so not through HTTP: ``bench/bench_multistage.py`` runs in a subprocess with
ComfyUI's python, samples in-process with ``comfy.sample.sample`` on a tiny SD1.5-shaped model whose UNet
call is a recording wrapper (returns zeros), and writes its figures as JSON. The plan comes from the pack's
own node (``AtelierMultistageFromStages``), so node + core + ComfyUI's gating are tested together.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from runner.server import find_comfyui, find_python

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_multistage.py"
SAMPLERS = "euler,ipndm,dpmpp_2m,plms"
PLMS_IN_PACK = (ROOT / "nodes" / "plms.py").exists()

pytestmark = pytest.mark.host


def run_harness(tmp_path, name, *args, timeout=1800):
    comfy = find_comfyui()
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, COMFYUI_PATH=str(comfy), ATELIER_FORCE_CPU="1")
    proc = subprocess.run([find_python(comfy), str(BENCH), "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
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
