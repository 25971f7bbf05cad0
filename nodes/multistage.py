"""Multistage conditioning nodes (seed 003): prompt i is the only positive prompt on exactly s_i steps.

The nodes compute the σ schedule exactly as the sampler will (``comfy.samplers.KSampler(...).sigmas``:
scheduler, steps, denoise truncation, and the penultimate-σ rule of dpm_2/uni_pc), ask
``samplers.multistage`` for percent ranges that gate each stage onto its steps, and set them with
``node_helpers.conditioning_set_values`` (copies; inputs are never mutated). The negative prompt is not
touched: it already covers every step.
"""
from ..samplers import multistage as core
from ..samplers import prompt_editing as editing

STAGES_TYPE = "ATELIER_STAGES"

# ComfyUI 0.15.1's lists, used only when ComfyUI is absent (schema checks); in ComfyUI the live lists
# are returned, so samplers added later (e.g. `plms`) show up.
_FALLBACK_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
_FALLBACK_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                        "linear_quadratic", "kl_optimal"]


def _comfy_lists():
    try:
        import comfy.samplers

        return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS
    except Exception:  # no ComfyUI (static schema checks)
        return _FALLBACK_SAMPLERS, _FALLBACK_SCHEDULERS


def _schedule_inputs():
    samplers, schedulers = _comfy_lists()
    return {
        "sampler_name": (samplers, {"default": "euler", "tooltip": "The sampler you will use. Only matters for "
                                    "dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2, whose schedule ComfyUI builds "
                                    "with one more step and then drops the next-to-last sigma."}),
        "scheduler": (schedulers, {"default": "normal", "tooltip": "The same scheduler as in your KSampler: "
                                   "stage boundaries are placed on its real sigma schedule."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "The same total steps as in your "
                          "KSampler (KSamplerAdvanced: its steps; start/end_at_step windows then see the "
                          "planned stage on every step they run)."}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "The same "
                              "denoise as in your KSampler (below 1 the sampler runs the tail of a longer "
                              "schedule; the plan follows it). Use 1.0 for KSamplerAdvanced."}),
    }


def _optional_inputs():
    return {
        "sigmas": ("SIGMAS", {"tooltip": "Optional: the exact SIGMAS you give SamplerCustom (e.g. from "
                              "BasicScheduler). When connected, sampler_name/scheduler/steps/denoise are ignored "
                              "and the plan is made on these sigmas."}),
    }


SCALE_TOOLTIP = ("When the stage steps do not sum to the steps the sampler runs: off = stop with an error "
                 "(default); on = scale them proportionally (rounded so the sum is exact) and say so in the table.")


def _compute_sigmas(model, sampler_name, scheduler, steps, denoise, sigmas=None):
    """The σ the sampler will evaluate: exactly what KSampler / SamplerCustom compute."""
    if sigmas is not None:
        return [float(v) for v in sigmas.flatten().tolist()], "custom SIGMAS input"
    import comfy.samplers

    samplers, schedulers = _comfy_lists()
    if sampler_name not in samplers:
        raise ValueError(f"Multistage: unknown sampler {sampler_name!r}; pick one of the sampler list")
    if scheduler not in schedulers:
        raise ValueError(f"Multistage: unknown scheduler {scheduler!r}; pick one of {list(schedulers)}")
    ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                 denoise=denoise)
    sig = [float(v) for v in ks.sigmas.flatten().tolist()]
    where = f"{sampler_name}, {scheduler}, steps {steps}, denoise {denoise:g}"
    return sig, where


def _percent_to_sigma(model):
    ms = model.get_model_object("model_sampling")
    fn = getattr(ms, "percent_to_sigma", None)
    # ComfyUI builds the class on the fly ("ModelSampling"); name the sampling type it derives from
    name = next((c.__name__ for c in type(ms).__mro__ if c.__name__ != "ModelSampling"), type(ms).__name__)
    if fn is None:
        raise ValueError(f"Multistage: this model's sampling ({name}) has no percent_to_sigma, so step ranges "
                         "cannot be mapped to ComfyUI conditioning ranges")
    probe = [float(fn(p / 16.0)) for p in range(1, 16)]
    if any(b > a for a, b in zip(probe, probe[1:])) or probe[0] == probe[-1]:
        raise ValueError(f"Multistage: this model's sampling ({name}) maps percent to sigma non-monotonically "
                         f"({probe[0]:.4g} .. {probe[-1]:.4g}), so exact step ranges cannot be computed")
    return (lambda p: float(fn(p))), name


def _check_no_range(cond, what):
    for entry in cond:
        d = entry[1]
        if d.get("start_percent", 0.0) != 0.0 or d.get("end_percent", 1.0) != 1.0:
            raise ValueError(
                f"Multistage: {what} already has a timestep range (start_percent={d.get('start_percent', 0.0)}, "
                f"end_percent={d.get('end_percent', 1.0)}); remove ConditioningSetTimestepRange before this node, "
                "the node sets the ranges itself")


def build_multistage(model, stage_conds, counts, labels, sampler_name, scheduler, steps, denoise,
                     scale=False, sigmas=None):
    """Shared by the nodes: (conditioning with exact ranges, step table)."""
    import node_helpers

    if model is None:
        raise ValueError("Multistage: connect the MODEL you sample with; its sigma mapping places the boundaries")
    sig, where = _compute_sigmas(model, sampler_name, scheduler, steps, denoise, sigmas)
    n = len(sig) - 1
    if n < 1:
        raise ValueError(f"Multistage: the sampler would run no step ({where}); raise steps or denoise")
    note = ""
    if sigmas is None and n != steps:
        note = (f" (ComfyUI's {scheduler} scheduler turns steps={steps} into {n} sampling steps"
                f"{' at this denoise' if denoise < 0.9999 else ''})")
    try:
        final_counts = core.check_stage_steps(counts, n, scale=scale)
    except core.MultistageError as e:
        raise ValueError(f"Multistage: {e}{note}") from None
    p2s, ms_name = _percent_to_sigma(model)
    try:
        plan = core.plan_stages(sig, final_counts, p2s)
    except core.MultistageError as e:
        raise ValueError(f"Multistage ({ms_name}, {where}): {e}") from None

    out = []
    for st, cond in zip(plan.stages, stage_conds):
        if st.steps == 0:
            continue
        out += node_helpers.conditioning_set_values(cond, {"start_percent": st.start_percent,
                                                           "end_percent": st.end_percent})
    header = f"Multistage plan: {n} steps ({where}); model sampling {ms_name}{note}"
    if list(final_counts) != [int(c) for c in counts]:
        header += f"\nstage steps scaled from {list(counts)} to {final_counts}"
    return out, core.format_plan(plan, labels, header)


def _encode(clip, texts):
    if clip is None:
        raise ValueError("Multistage: the CLIP input is None (this checkpoint has no text encoder); connect a CLIP")
    cache = {}
    out = []
    for t in texts:
        if t not in cache:
            cache[t] = clip.encode_from_tokens_scheduled(clip.tokenize(t))
        out.append(cache[t])
    return out


def _result(cond, table):
    return {"ui": {"text": [table]}, "result": (cond, table)}


_MODEL_INPUT = ("MODEL", {"tooltip": "The model you sample with: its sigma mapping places the boundaries."})


class _PlanNode:
    """What the three planning nodes share: category, outputs, and the UI text."""

    CATEGORY = "atelier/conditioning"
    FUNCTION = "apply"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("positive", "step_table")
    OUTPUT_TOOLTIPS = ("Positive conditioning: every stage with its exact step range. Connect to the sampler's "
                       "positive input; the negative stays as it is.",
                       "The step table (stage -> steps, sigmas, percents; step -> stage).")


class AtelierMultistageConditioning(_PlanNode):
    DESCRIPTION = ("Multistage prompts (seed 003): one stage per line, `8: A Chinese dragon` then `12: A fish`. "
                   "Each prompt is the only positive conditioning on exactly its steps, for any scheduler and "
                   "sampler, because the boundaries are placed on the sampler's real sigma schedule.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "clip": ("CLIP", {"tooltip": "Text encoder used for every stage prompt."}),
            "model": _MODEL_INPUT,
            "stages": ("STRING", {"multiline": True, "default": "8: A Chinese dragon\n12: A fish",
                                  "tooltip": "One stage per line: `<steps>: <prompt>`, in sampling order. Steps "
                                             "are whole numbers >= 0 summing to the total; 0 skips a stage. "
                                             "Lines starting with # are ignored."}),
        }
        req.update(_schedule_inputs())
        req["scale_steps"] = ("BOOLEAN", {"default": False, "tooltip": SCALE_TOOLTIP})
        return {"required": req, "optional": _optional_inputs()}

    def apply(self, clip, model, stages, sampler_name, scheduler, steps, denoise, scale_steps=False, sigmas=None):
        try:
            parsed = core.parse_stage_lines(stages)
        except core.MultistageError as e:
            raise ValueError(f"Multistage: {e}") from None
        texts = [p for _, p in parsed]
        conds = _encode(clip, texts)
        cond, table = build_multistage(model, conds, [c for c, _ in parsed], texts, sampler_name, scheduler,
                                       steps, denoise, scale_steps, sigmas)
        return _result(cond, table)


class AtelierStageList:
    DESCRIPTION = ("Collects up to 4 CONDITIONING stages with their step counts into a stage list, in sampling "
                   "order. Chain several (previous input) for more stages; feed the list to "
                   "Multistage Conditioning (stage list).")
    CATEGORY = "atelier/conditioning"
    FUNCTION = "collect"
    RETURN_TYPES = (STAGES_TYPE,)
    RETURN_NAMES = ("stages",)
    OUTPUT_TOOLTIPS = ("The stages so far (previous stages first).",)

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "conditioning_1": ("CONDITIONING", {"tooltip": "Stage 1 prompt (after any previous stages)."}),
            "steps_1": ("INT", {"default": 8, "min": 0, "max": 10000, "tooltip": "Steps guided by stage 1."}),
        }
        opt = {}
        for k in (2, 3, 4):
            opt[f"conditioning_{k}"] = ("CONDITIONING", {"tooltip": f"Stage {k} prompt (leave unconnected to "
                                                                     "use fewer stages)."})
            req[f"steps_{k}"] = ("INT", {"default": 0, "min": 0, "max": 10000,
                                         "tooltip": f"Steps guided by stage {k}; must be 0 when "
                                                    f"conditioning_{k} is not connected."})
        opt["previous"] = (STAGES_TYPE, {"tooltip": "Stages that come before these (chain for more than 4)."})
        return {"required": req, "optional": opt}

    def collect(self, conditioning_1, steps_1, steps_2=0, steps_3=0, steps_4=0, conditioning_2=None,
                conditioning_3=None, conditioning_4=None, previous=None):
        stages = list(previous or ())
        given = [(conditioning_1, steps_1), (conditioning_2, steps_2), (conditioning_3, steps_3),
                 (conditioning_4, steps_4)]
        for k, (cond, n) in enumerate(given, 1):
            if cond is None:
                if n:
                    raise ValueError(f"Stage list: steps_{k} is {n} but conditioning_{k} is not connected; connect "
                                     f"it or set steps_{k} to 0")
                continue
            stages.append((cond, int(n), f"stage {len(stages) + 1} (conditioning_{k})"))
        return (tuple(stages),)


class AtelierMultistageFromStages(_PlanNode):
    DESCRIPTION = ("Multistage conditioning from a stage list (CONDITIONING + steps per stage, see Stage List): "
                   "each stage is the only positive conditioning on exactly its steps.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "model": _MODEL_INPUT,
            "stages": (STAGES_TYPE, {"tooltip": "Stages in sampling order (from Stage List)."}),
        }
        req.update(_schedule_inputs())
        req["scale_steps"] = ("BOOLEAN", {"default": False, "tooltip": SCALE_TOOLTIP})
        return {"required": req, "optional": _optional_inputs()}

    def apply(self, model, stages, sampler_name, scheduler, steps, denoise, scale_steps=False, sigmas=None):
        if not stages:
            raise ValueError("Multistage: the stage list is empty; connect at least one conditioning")
        for k, (cond, _, label) in enumerate(stages, 1):
            _check_no_range(cond, label)
        cond, table = build_multistage(model, [c for c, _, _ in stages], [n for _, n, _ in stages],
                                       [label for _, _, label in stages], sampler_name, scheduler, steps,
                                       denoise, scale_steps, sigmas)
        return _result(cond, table)


class AtelierPromptEditing(_PlanNode):
    DESCRIPTION = ("AUTOMATIC1111 prompt editing in ComfyUI: [from:to:when], [to:when], [from::when] (when = step "
                   "number, or fraction with a decimal point), nesting, [a|b] alternation, escapes \\[ \\] \\:. "
                   "Each resulting prompt is used on exactly its steps for any scheduler.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "clip": ("CLIP", {"tooltip": "Text encoder used for every distinct prompt."}),
            "model": _MODEL_INPUT,
            "text": ("STRING", {"multiline": True, "default": "[A Chinese dragon:A fish:8], ink painting",
                                "tooltip": "Prompt with A1111 editing syntax, e.g. `a [dragon:fish:8] in the sea`, "
                                           "`[from::0.5]`, `[cat|dog]`."}),
        }
        req.update(_schedule_inputs())
        req["counting"] = (list(editing.COUNTING_MODES), {
            "default": "a1111",
            "tooltip": "a1111: identical to AUTOMATIC1111 (`from` runs while step index <= when, so [a:b:8] gives "
                       "a on 9 steps); exact: `when` is the number of steps of `from` ([a:b:8] = 8 + rest)."})
        return {"required": req, "optional": _optional_inputs()}

    def apply(self, clip, model, text, sampler_name, scheduler, steps, denoise, counting="a1111", sigmas=None):
        sig, _ = _compute_sigmas(model, sampler_name, scheduler, steps, denoise, sigmas)
        n = len(sig) - 1
        if n < 1:
            raise ValueError("Prompt editing: the sampler would run no step; raise steps or denoise")
        try:
            stages = editing.prompt_stages(text, n, counting)
        except editing.PromptEditingError as e:
            raise ValueError(f"Prompt editing: {e}") from None
        texts = [t for t, _ in stages]
        conds = _encode(clip, texts)
        cond, table = build_multistage(model, conds, [c for _, c in stages], [repr(t) for t in texts],
                                       sampler_name, scheduler, steps, denoise, False, sigmas)
        return _result(cond, table)


NODE_CLASS_MAPPINGS = {
    "AtelierMultistageConditioning": AtelierMultistageConditioning,
    "AtelierStageList": AtelierStageList,
    "AtelierMultistageFromStages": AtelierMultistageFromStages,
    "AtelierPromptEditing": AtelierPromptEditing,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierMultistageConditioning": "Multistage Conditioning (Atelier)",
    "AtelierStageList": "Stage List (Atelier)",
    "AtelierMultistageFromStages": "Multistage Conditioning, stage list (Atelier)",
    "AtelierPromptEditing": "Prompt Editing, A1111 syntax (Atelier)",
}
