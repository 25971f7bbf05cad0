"""Multistage conditioning nodes ("Multistage guidance on the diffusion model inspired by human artists' creative
thinking", FITEE 2023): prompt i is the only positive prompt on exactly s_i steps.

Each node gets the σ schedule exactly as the sampler will (``host.sampling.sampler_sigmas``: scheduler, steps,
denoise truncation and the penultimate-σ rule of dpm_2/uni_pc; or the SIGMAS input) and the model's
``percent_to_sigma``, asks ``samplers.multistage`` for the plan and its step table, and sets each stage's
range with ``host.sampling.conditioning_with`` (copies; inputs are never mutated). The negative prompt is not
touched: it already covers every step.
"""
from ..host import sampling
from ..samplers import multistage as core
from ..samplers import prompt_editing as editing

STAGES_TYPE = "ATELIER_STAGES"


def _schedule_inputs():
    return {
        "sampler_name": (sampling.sampler_names(), {
            "default": "euler", "tooltip": "The sampler you will use. Only matters for dpm_2, dpm_2_ancestral, "
            "uni_pc and uni_pc_bh2, whose schedule ComfyUI builds with one more step and then drops the "
            "next-to-last sigma."}),
        "scheduler": (sampling.scheduler_names(), {
            "default": "normal", "tooltip": "The same scheduler as in your KSampler: stage boundaries are placed "
            "on its real sigma schedule."}),
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


def _schedule(model, sampler_name, scheduler, steps, denoise, sigmas=None):
    """What the host knows before planning: the σ the sampler evaluates and the model's percent → σ map."""
    if model is None:
        raise ValueError("Multistage: connect the MODEL you sample with; its sigma mapping places the boundaries")
    p2s, name = sampling.percent_to_sigma(model)
    if sigmas is not None:
        return core.Schedule.custom(sigmas, p2s, name)
    core.check_sampler_choice(sampler_name, scheduler, sampling.sampler_names(), sampling.scheduler_names())
    sig = sampling.sampler_sigmas(model, sampler_name, scheduler, steps, denoise)
    return core.Schedule.from_settings(sig, p2s, name, sampler_name, scheduler, steps, denoise)


def _with_ranges(plan, stage_conds):
    """Each stage's conditioning with its planned range (copies), concatenated; zero-step stages left out."""
    return [entry for k, values in plan.ranges() for entry in sampling.conditioning_with(stage_conds[k], values)]


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
    DESCRIPTION = ("Multistage prompts (\"Multistage guidance on the diffusion model inspired by human artists' "
                   "creative thinking\", FITEE 2023): one stage per line, `8: A Chinese dragon` then `12: A fish`. "
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
        schedule = _schedule(model, sampler_name, scheduler, steps, denoise, sigmas)
        texts, plan, table = core.plan_stage_text(stages, schedule, scale_steps)
        return _result(_with_ranges(plan, _encode(clip, texts)), table)


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
        given = [(conditioning_1, steps_1), (conditioning_2, steps_2), (conditioning_3, steps_3),
                 (conditioning_4, steps_4)]
        return (core.collect_stages(previous, given),)


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
        schedule = _schedule(model, sampler_name, scheduler, steps, denoise, sigmas)
        conds, plan, table = core.plan_stage_list(stages, schedule, scale_steps)
        return _result(_with_ranges(plan, conds), table)


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
        schedule = _schedule(model, sampler_name, scheduler, steps, denoise, sigmas)
        texts, plan, table = core.plan_prompt_editing(text, counting, schedule)
        return _result(_with_ranges(plan, _encode(clip, texts)), table)


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
