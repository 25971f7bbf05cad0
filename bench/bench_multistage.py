"""Multistage conditioning, checked inside a real ComfyUI: is every step guided by exactly its planned stage?

Run from the pack root with ComfyUI's Python (CPU is enough; the model output is faked):

    COMFYUI_PATH=/path/to/ComfyUI  /path/to/ComfyUI/.venv/bin/python -m bench.bench_multistage [--steps 1-200]

For every scheduler in ComfyUI's list, every step count and every sampler asked for, the pack's
``AtelierMultistageFromStages`` node plans a few stages (one of them zero-step) on the real schedule,
then ``comfy.sample.sample`` runs a tiny SD1.5-shaped model whose UNet call is replaced by a recording
wrapper (``model_function_wrapper``, returns zeros). Every model evaluation records the σ and which
positive stage(s) it received. Checked: each evaluation at a schedule σ_i sees exactly the stage the
plan gives step i; the negative is seen at every evaluation; the number of model calls equals a run with
one plain prompt. Also KSamplerAdvanced windows and SamplerCustom with a SIGMAS input. Prints figures;
``--json`` writes them for the host test.
"""
import argparse
import json
import pathlib
import sys
import time

from atelier.host.locate import ComfyNotFound, attach


def setup_comfy(path=None):
    """ComfyUI importable (``--comfyui``, COMFYUI_PATH or the ComfyUI the pack sits in; CPU without CUDA), then
    the pack, which registers ``plms`` once ComfyUI's sampler module is loaded."""
    attach(path)
    import utils.extra_config  # noqa: F401  ComfyUI's top-level `utils` before `nodes` puts comfy/ first on sys.path
    import comfy.model_management
    import comfy.samplers  # noqa: F401

    # The fake UNet needs no memory; skip reading /proc/meminfo on every model call (a third of the
    # per-call time on a small CPU). Batching decisions are unchanged: there is always room.
    comfy.model_management.get_free_memory = lambda *a, **k: 1 << 40
    import atelier.nodes  # noqa: F401  the node tables; registers `plms`


def tiny_model():
    """A ModelPatcher with SD1.5's model sampling (ModelSamplingDiscrete, EPS) and a minimal UNet."""
    import torch
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1],
                channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                transformer_depth_middle=1, use_spatial_transformer=True, context_dim=768, num_heads=1,
                num_head_channels=-1, use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
                use_temporal_attention=False, use_temporal_resblock=False)
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(unet), device="cpu")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class Recorder:
    """Per model evaluation: σ and the cond values seen (positive stage ids > 0, negative -1)."""

    def __init__(self, base):
        self.model = base.clone()
        self.model.set_model_unet_function_wrapper(self.unet)
        self.model.set_model_sampler_post_cfg_function(self.close)
        self.calls = 0
        self.pending = []
        self.evals = []

    def reset(self):
        self.calls, self.pending, self.evals = 0, [], []

    def unet(self, apply_model, a):
        import torch

        self.calls += 1
        kinds = a["cond_or_uncond"]
        for kind, chunk in zip(kinds, a["c"]["c_crossattn"].chunk(len(kinds))):
            for row in chunk:
                self.pending.append((kind, int(round(float(row[0, 0])))))
        return torch.zeros_like(a["input"])

    def close(self, args):
        sigma = float(args["sigma"].flatten()[0])
        pos = sorted(v for k, v in self.pending if k == 0)
        neg = [v for k, v in self.pending if k == 1]
        self.evals.append((sigma, pos, neg))
        self.pending = []
        return args["denoised"]


def cond(value):
    import torch

    return [[torch.full((1, 1, 4), float(value)), {}]]


def stage_counts(n, variant):
    """A few stages with boundaries at varied places, always one zero-step stage."""
    if n == 1:
        return [0, 1]
    a = 1 + (variant * 7) % (n - 1) if n > 1 else 0  # first stage 1..n-1 steps
    rest = n - a
    b = rest // 2
    return [a, 0, b, rest - b] if b else [a, 0, rest]


class Harness:
    def __init__(self, comfy_path=None):
        setup_comfy(comfy_path)
        from atelier.nodes import multistage

        self.node = multistage.AtelierMultistageFromStages()
        self.base = tiny_model()
        self.rec = Recorder(self.base)
        import torch

        self.noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        self.latent = torch.zeros(1, 4, 8, 8)
        self.negative = cond(-1)

    def schedule(self, sampler, scheduler, steps, denoise):
        import comfy.samplers

        ks = comfy.samplers.KSampler(self.base, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler,
                                     denoise=denoise)
        return [float(v) for v in ks.sigmas.tolist()]

    def plan(self, counts, sampler, scheduler, steps, denoise, sigmas=None):
        stages = tuple((cond(k + 1), c, f"stage {k + 1}") for k, c in enumerate(counts))
        out = self.node.apply(self.base, stages, sampler, scheduler, steps, denoise, sigmas=sigmas)
        return out["result"][0], out["result"][1]

    def run(self, positive, sampler, scheduler, steps, denoise, cfg, **kw):
        import comfy.sample

        self.rec.reset()
        comfy.sample.sample(self.rec.model, self.noise, steps, cfg, sampler, scheduler, positive, self.negative,
                            self.latent, denoise=denoise, disable_pbar=True, seed=0, **kw)
        return list(self.rec.evals), self.rec.calls

    def run_custom(self, positive, sampler, sigmas, cfg):
        import comfy.sample
        import comfy.samplers

        self.rec.reset()
        comfy.sample.sample_custom(self.rec.model, self.noise, cfg, comfy.samplers.sampler_object(sampler), sigmas,
                                   positive, self.negative, self.latent, disable_pbar=True, seed=0)
        return list(self.rec.evals), self.rec.calls


def check_evals(evals, sig, expected, cfg, intermediate="own"):
    """Compare recorded evaluations with the plan. Returns (steps checked, errors, intermediate evals, bad steps)."""
    errors = []
    bad = set()
    index = {}
    for i, s in enumerate(sig[:-1]):
        index.setdefault(s, i)
    seen_steps = set()
    inter = 0
    for sigma, pos, neg in evals:
        if sigma in index:
            i = index[sigma]
            seen_steps.add(i)
            want = [expected[i] + 1]
        else:
            inter += 1
            # an evaluation between σ_{i+1} and σ_i belongs to step i (see docs/multistage.md)
            i = next((j for j in range(len(sig) - 1) if sig[j + 1] < sigma < sig[j]), None)
            if i is None:
                errors.append(f"evaluation at sigma {sigma} outside the schedule")
                continue
            want = [expected[i] + 1]
        if pos != want:
            bad.add(i)
            errors.append(f"sigma {sigma:.6g} (step {i + 1}) saw stages {pos}, planned {want}")
        if cfg != 1.0 and neg != [-1]:
            errors.append(f"sigma {sigma:.6g}: negative seen {neg}")
    missing = [i + 1 for i in range(len(sig) - 1) if i not in seen_steps]
    if missing:
        errors.append(f"steps never evaluated at their sigma: {missing[:10]}")
    return len(seen_steps), errors, inter, bad


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: COMFYUI_PATH, or the ComfyUI the "
                    "pack is installed in)")
    ap.add_argument("--steps", default="1-200", help="step counts, e.g. 1-60 or 1,5,20")
    ap.add_argument("--samplers", default="euler", help="comma list; 'plms' is skipped when not registered")
    ap.add_argument("--schedulers", default="all", help="comma list or all (ComfyUI's scheduler list)")
    ap.add_argument("--denoise", default="1.0", help="comma list, e.g. 1.0,0.6")
    ap.add_argument("--cfg", type=float, default=2.0, help="cfg scale (not 1, so the negative is evaluated too)")
    ap.add_argument("--extra-calls-every", type=int, default=1,
                    help="compare model calls with a single-prompt run every k-th step count")
    ap.add_argument("--extras", action="store_true", help="also KSamplerAdvanced windows, SamplerCustom, dpm_2/heun")
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--table", default="", help="only print the node's step table for these stages "
                    "(text mode, e.g. '8: A Chinese dragon\\n12: A fish') with --samplers/--schedulers/--steps")
    return ap, ap.parse_args(argv)


def step_counts(text):
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main(argv=None):
    ap, a = parse_args(argv)
    t0 = time.time()
    try:
        h = Harness(a.comfyui)
    except ComfyNotFound as e:
        ap.error(str(e))
    if a.table:
        return print_tables(h, a)
    import comfy.samplers

    steps_list = step_counts(a.steps)
    schedulers = list(comfy.samplers.KSampler.SCHEDULERS) if a.schedulers == "all" else a.schedulers.split(",")
    samplers, skipped = [], []
    for s in a.samplers.split(","):
        (samplers if s in comfy.samplers.KSampler.SAMPLERS else skipped).append(s)
    denoises = [float(d) for d in a.denoise.split(",")]
    fig = {"runs": 0, "steps_checked": 0, "steps_exact": 0, "evaluations": 0, "errors": [], "extra_calls": 0,
           "call_comparisons": 0, "samplers": samplers, "samplers_skipped": skipped, "schedulers": schedulers,
           "denoise": denoises, "steps": [steps_list[0], steps_list[-1]], "per_scheduler": {},
           "schedule_steps_differ": 0, "nan_schedules_refused": 0}
    for sampler in samplers:
        for scheduler in schedulers:
            for denoise in denoises:
                for v, n in enumerate(steps_list):
                    check_one(h, fig, a, sampler, scheduler, denoise, v, n)
    if a.extras:
        fig["extras"] = extras(h, a.cfg)
        fig["errors"] += fig["extras"].pop("errors")
    fig["seconds"] = round(time.time() - t0, 1)
    fig["exact_fraction"] = fig["steps_exact"] / max(1, fig["steps_checked"])
    report(fig)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(fig, indent=1))
    return 1 if fig["errors"] or fig["extra_calls"] else 0


def check_one(h, fig, a, sampler, scheduler, denoise, v, n):
    """Plan variant ``v`` on ``n`` steps, sample, compare every evaluation with the plan; add to ``fig``."""
    per = fig["per_scheduler"].setdefault(scheduler, {"steps_checked": 0, "exact": 0})
    run = f"{sampler}/{scheduler}/{n}/{denoise}"
    sig = h.schedule(sampler, scheduler, n, denoise)
    big_n = len(sig) - 1
    if any(x != x for x in sig):  # ComfyUI's own schedule is NaN (kl_optimal at 1 step)
        try:
            h.plan(stage_counts(big_n, v), sampler, scheduler, n, denoise)
            fig["errors"].append(f"{run}: NaN schedule not refused")
        except ValueError:
            fig["nan_schedules_refused"] += 1
        return
    fig["schedule_steps_differ"] += big_n != n
    counts = stage_counts(big_n, v)
    expected = [k for k, c in enumerate(counts) for _ in range(c)]
    try:
        positive, _ = h.plan(counts, sampler, scheduler, n, denoise)
    except ValueError as e:
        fig["errors"].append(f"{run}: plan failed: {e}")
        return
    evals, calls = h.run(positive, sampler, scheduler, n, denoise, a.cfg)
    _, errs, _, bad = check_evals(evals, sig, expected, a.cfg)
    fig["runs"] += 1
    fig["evaluations"] += len(evals)
    fig["steps_checked"] += big_n
    per["steps_checked"] += big_n
    per["exact"] += big_n - len(bad)
    fig["steps_exact"] += big_n - len(bad)
    fig["errors"] += [f"{run}: {e}" for e in errs[:3]]
    if v % a.extra_calls_every == 0:
        _, plain_calls = h.run(cond(1), sampler, scheduler, n, denoise, a.cfg)
        fig["call_comparisons"] += 1
        fig["extra_calls"] += calls - plain_calls


def print_tables(h, a):
    """The step table the node shows, for documentation (stage prompts are not encoded)."""
    from atelier.samplers import multistage as core

    stages = core.parse_stage_lines(a.table.replace("\\n", "\n"))
    for sampler in a.samplers.split(","):
        for scheduler in a.schedulers.split(","):
            for n in ([int(x) for x in a.steps.split(",")] if "-" not in a.steps else [20]):
                for denoise in [float(d) for d in a.denoise.split(",")]:
                    listed = tuple((cond(k + 1), c, p) for k, (c, p) in enumerate(stages))
                    print(h.node.apply(h.base, listed, sampler, scheduler, n, denoise)["result"][1])
                    print()
    return 0


def extras(h, cfg):
    """KSamplerAdvanced windows, SamplerCustom with SIGMAS, and what heun/dpm_2 see between steps."""
    out = {"errors": [], "advanced_windows": 0, "custom_runs": 0, "intermediate": {}}
    for scheduler in ("normal", "karras", "exponential"):
        for n in (7, 20, 31):
            windows_and_custom(h, cfg, scheduler, n, out)
    for sampler in ("heun", "dpm_2"):
        out["intermediate"][sampler] = between_steps(h, cfg, sampler, out["errors"])
    return out


def windows_and_custom(h, cfg, scheduler, n, out):
    """KSamplerAdvanced windows of a full-schedule plan; SamplerCustom with BasicScheduler's sigmas."""
    import comfy.samplers

    counts = stage_counts(n, n)
    expected = [k for k, c in enumerate(counts) for _ in range(c)]
    sig = h.schedule("euler", scheduler, n, 1.0)
    positive, _ = h.plan(counts, "euler", scheduler, n, 1.0)
    # KSamplerAdvanced: same steps, a window of them; the full-schedule plan holds in any window
    for start, stop in ((0, n // 2), (n // 2, n), (n // 3, n - 1)):
        evals, _ = h.run(positive, "euler", scheduler, n, 1.0, cfg, start_step=start, last_step=stop,
                         force_full_denoise=True)
        _, errs, _, _ = check_evals(evals, sig[start:stop + 1], expected[start:stop], cfg)
        out["errors"] += [f"advanced {scheduler}/{n}/[{start},{stop}): {e}" for e in errs]
        out["advanced_windows"] += 1
    # SamplerCustom: BasicScheduler's sigmas (denoise 0.6 tail) into the SIGMAS input
    total = int(n / 0.6)
    custom = comfy.samplers.calculate_sigmas(h.base.get_model_object("model_sampling"), scheduler,
                                             total).cpu()[-(n + 1):]
    positive_c, _ = h.plan(counts, "euler", scheduler, n, 1.0, sigmas=custom)
    for sampler in ("euler", "dpmpp_2m"):
        evals, _ = h.run_custom(positive_c, sampler, custom, cfg)
        _, errs, _, _ = check_evals(evals, [float(x) for x in custom.tolist()], expected, cfg)
        out["errors"] += [f"custom {sampler}/{scheduler}/{n}: {e}" for e in errs]
        out["custom_runs"] += 1


def between_steps(h, cfg, sampler, errors):
    """Samplers that evaluate between steps: heun (at σ_{i+1}), dpm_2 (log-midpoint)."""
    stat = {"evaluations": 0, "between_steps": 0, "between_own_stage": 0, "at_next_sigma_next_stage": 0}
    for scheduler in ("normal", "karras"):
        for n in (10, 20):
            sig = h.schedule(sampler, scheduler, n, 1.0)
            counts = stage_counts(len(sig) - 1, n)
            expected = [k for k, c in enumerate(counts) for _ in range(c)]
            positive, _ = h.plan(counts, sampler, scheduler, n, 1.0)
            evals, _ = h.run(positive, sampler, scheduler, n, 1.0, cfg)
            _, errs, inter, _ = check_evals(evals, sig, expected, cfg)
            errors += [f"{sampler}/{scheduler}/{n}: {e}" for e in errs]
            stat["evaluations"] += len(evals)
            stat["between_steps"] += inter
            stat["between_own_stage"] += inter - len(errs)
            # heun's second evaluation at σ_{i+1} sees step i+1's stage by construction
            prev = None
            for sigma, pos, _ in evals:
                if prev is not None and sigma in sig and sig.index(sigma) == sig.index(prev) + 1:
                    stat["at_next_sigma_next_stage"] += pos == [expected[sig.index(sigma)] + 1]
                prev = sigma if sigma in sig else None
    return stat


def report(fig):
    print(f"multistage exactness: samplers {fig['samplers']} (skipped, not registered: {fig['samplers_skipped']}), "
          f"denoise {fig['denoise']}, steps {fig['steps'][0]}..{fig['steps'][1]}")
    print(f"{'scheduler':>18}  {'steps checked':>13}  {'exact':>8}")
    for name, per in fig["per_scheduler"].items():
        pct = 100.0 * per["exact"] / max(1, per["steps_checked"])
        print(f"{name:>18}  {per['steps_checked']:>13}  {pct:>7.2f}%")
    print(f"exact stage on {100.0 * fig['exact_fraction']:.2f}% of {fig['steps_checked']} steps")
    print(f"runs {fig['runs']}, steps checked {fig['steps_checked']}, model evaluations {fig['evaluations']}, "
          f"errors {len(fig['errors'])}")
    print(f"extra model calls vs a single prompt: {fig['extra_calls']} over {fig['call_comparisons']} compared runs")
    print(f"ComfyUI schedules that contain NaN (kl_optimal at 1 step), refused with a clear error: "
          f"{fig['nan_schedules_refused']}")
    print(f"step counts where the scheduler runs a different number of steps than asked: "
          f"{fig['schedule_steps_differ']}")
    if "extras" in fig:
        ex = fig["extras"]
        print(f"KSamplerAdvanced windows checked: {ex['advanced_windows']}; SamplerCustom runs: {ex['custom_runs']}")
        for s, st in ex["intermediate"].items():
            print(f"{s}: {st['evaluations']} evaluations, {st['between_steps']} between schedule sigmas "
                  f"({st['between_own_stage']} saw their own step's stage), {st['at_next_sigma_next_stage']} at "
                  f"the next step's sigma saw the next step's stage")
    for e in fig["errors"][:20]:
        print("ERROR", e)
    print(f"time {fig['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
