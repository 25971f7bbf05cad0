"""Multistage conditioning plans ("Multistage guidance on the diffusion model inspired by human artists'
creative thinking", FITEE 2023): prompt i is the positive conditioning on exactly s_i steps.

ComfyUI gates a conditioning entry by the σ the model is evaluated at: an entry with ``start_percent``
/ ``end_percent`` is active while ``percent_to_sigma(end) <= σ <= percent_to_sigma(start)``, where
"percent" is a fraction of *model time*, not of steps. So to make a stage own steps ``[a, b)`` of a
σ schedule we put a σ threshold strictly between σ_{a-1} and σ_a (and between σ_{b-1} and σ_b) and
convert it back to a percent by inverting the model's monotone ``percent_to_sigma`` by bisection.

This module is pure Python (no ComfyUI, no torch): the node gets the real schedule and the model's
``percent_to_sigma`` from the host, wraps them in a :class:`Schedule` and calls one of the ``plan_*``
functions at the end of this module; tests pass hand-made ones.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from . import prompt_editing as editing

#: Where a threshold sits between two consecutive σ, as a fraction of the log gap measured from the
#: lower σ. 0.5 would be the geometric mean; 0.25 keeps the threshold clear of the log-midpoint that
#: dpm_2, dpmpp_sde and dpmpp_2s evaluate inside a step, so those evaluations see the stage of the
#: step they belong to (see docs/multistage.md).
DEFAULT_LOG_POSITION = 0.25


class MultistageError(ValueError):
    """Bad stage list or a schedule that no percent range can split; the message says how to fix it."""


@dataclass(frozen=True)
class StagePlan:
    """One stage: which steps it owns and the percents that make ComfyUI use it on exactly those steps.

    ``first_step``/``stop_step`` are 0-based, ``stop_step`` exclusive. A zero-step stage has
    ``start_percent = end_percent = None``: it must not be given to the sampler at all.
    """

    index: int
    steps: int
    first_step: int
    stop_step: int
    start_percent: Optional[float]
    end_percent: Optional[float]
    start_sigma: Optional[float]
    end_sigma: Optional[float]


@dataclass(frozen=True)
class MultistagePlan:
    sigmas: tuple
    stages: tuple
    step_stage: tuple  # stage index of every step (len N)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def ranges(self) -> list:
        """(stage index, {"start_percent", "end_percent"}) of every stage that gets steps, in order: the
        values the node sets on that stage's conditioning (a zero-step stage is left out)."""
        return [(st.index, {"start_percent": st.start_percent, "end_percent": st.end_percent})
                for st in self.stages if st.steps]


def _f32(x: float) -> float:
    """Round to float32: ComfyUI compares float32 σ tensors with these thresholds."""
    if math.isinf(x) or abs(x) > 3.0e38:
        return x
    return struct.unpack("f", struct.pack("f", x))[0]


def check_schedule(sigmas: Sequence[float]) -> list:
    """A usable σ schedule: at least two values, finite, ≥ 0, non-increasing."""
    s = [float(v) for v in sigmas]
    if len(s) < 2:
        raise MultistageError(
            f"the sigma schedule has {len(s)} value(s), so the sampler runs no step; "
            "check steps and denoise (denoise 0 runs nothing)"
        )
    for i, v in enumerate(s):
        if not math.isfinite(v) or v < 0:
            raise MultistageError(f"sigma {i} of the schedule is {v}; sigmas must be finite and >= 0")
    for i in range(len(s) - 1):
        if s[i + 1] > s[i]:
            raise MultistageError(
                f"the sigma schedule rises at step {i + 1} ({s[i]:.6g} -> {s[i + 1]:.6g}); "
                "a multistage plan needs a descending schedule (highest noise first)"
            )
    return s


def check_stage_steps(counts: Sequence, total: int, scale: bool = False) -> list:
    """Validate per-stage step counts against the number of steps the sampler runs.

    Counts must be whole numbers ≥ 0. If they do not sum to ``total`` this is an error unless
    ``scale`` is set, in which case they are scaled proportionally (largest remainder, so the sum is
    exact) and a stage that would lose all its steps is an error rather than a silent drop.
    """
    if total < 1:
        raise MultistageError(f"the sampler runs {total} steps; a multistage plan needs at least 1")
    if len(counts) == 0:
        raise MultistageError("no stages given; give at least one stage, e.g. `20: a painting of a fish`")
    ints = []
    for i, c in enumerate(counts):
        if isinstance(c, bool):
            raise MultistageError(f"stage {i + 1}: step count {c!r} is not a number")
        if isinstance(c, float):
            if not math.isfinite(c) or c != int(c):
                raise MultistageError(f"stage {i + 1}: step count {c} is not a whole number of steps")
            c = int(c)
        if not isinstance(c, int):
            raise MultistageError(f"stage {i + 1}: step count {c!r} is not a whole number")
        if c < 0:
            raise MultistageError(f"stage {i + 1}: step count {c} is negative; use 0 to skip a stage")
        ints.append(c)
    got = sum(ints)
    if got == total:
        return ints
    listed = " + ".join(str(c) for c in ints)
    if not scale:
        extra = ""
        if len(ints) > total:
            extra = f" (there are {len(ints)} stages but only {total} steps: at most {total} stages can get a step)"
        raise MultistageError(
            f"the stage steps sum to {got} ({listed}) but the sampler runs {total} steps{extra}; "
            f"make them sum to {total}, or enable scaling to spread them proportionally"
        )
    if got == 0:
        raise MultistageError("every stage has 0 steps, so there is nothing to scale; give at least one stage a step")
    raw = [c * total / got for c in ints]
    out = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    lost = [i + 1 for i, (c, o) in enumerate(zip(ints, out)) if c > 0 and o == 0]
    if lost:
        raise MultistageError(
            f"scaling {listed} to {total} steps leaves stage(s) {lost} with no step "
            f"({sum(1 for c in ints if c > 0)} non-empty stages, {total} steps); give them more steps or raise "
            "the total"
        )
    return out


def invert_percent(percent_to_sigma: Callable[[float], float], low: float, high: float, target: float,
                   iterations: int = 64) -> Optional[float]:
    """A percent p with low < percent_to_sigma(p) < high (strict, also after float32 rounding).

    Bisection towards ``target`` on the decreasing map p -> σ; among the points visited, the one
    whose σ is closest to the target in log space wins. Returns None when no percent separates.
    """
    lo_p, hi_p = 0.0, 1.0
    best, best_err = None, math.inf
    log_t = math.log(target) if target > 0 else -math.inf
    for _ in range(iterations):
        mid = 0.5 * (lo_p + hi_p)
        if hi_p - lo_p < 1e-12:
            break
        v = float(percent_to_sigma(mid))
        vf = _f32(v)
        if low < v < high and low < vf < high:
            err = abs(math.log(v) - log_t) if v > 0 else math.inf
            if err < best_err:
                best, best_err = mid, err
        if v > target:
            lo_p = mid
        elif v < target:
            hi_p = mid
        else:
            break
    return best


def boundary_target(high: float, low: float, log_position: float = DEFAULT_LOG_POSITION) -> float:
    """The σ to aim at between two consecutive schedule values (high > low)."""
    if low <= 0.0:
        return high * 0.5
    return math.exp(math.log(low) + log_position * (math.log(high) - math.log(low)))


def plan_stages(sigmas: Sequence[float], counts: Sequence[int],
                percent_to_sigma: Callable[[float], float],
                log_position: float = DEFAULT_LOG_POSITION) -> MultistagePlan:
    """Percent ranges that make stage k ComfyUI's only positive conditioning on its ``counts[k]`` steps.

    ``sigmas`` is the schedule the sampler runs (N+1 values, step i evaluates the model at σ_i);
    ``counts`` must already sum to N (see :func:`check_stage_steps`). Raises :class:`MultistageError`
    when a boundary falls between two equal σ (no threshold can separate them) or where the model's
    ``percent_to_sigma`` cannot reach between them.
    """
    s = check_schedule(sigmas)
    n = len(s) - 1
    counts = check_stage_steps(list(counts), n)
    if not 0.0 < log_position < 1.0:
        raise MultistageError(f"log_position must be strictly between 0 and 1, got {log_position}")

    step_stage = [k for k, c in enumerate(counts) for _ in range(c)]
    thresholds = _thresholds(s, step_stage, percent_to_sigma, log_position)
    stages = _stage_ranges(counts, thresholds, n, percent_to_sigma)
    plan = MultistagePlan(tuple(s), tuple(stages), tuple(step_stage))
    bad = verify_plan(plan, percent_to_sigma)
    if bad:
        step, seen = bad[0]
        raise MultistageError(
            f"internal check failed: step {step + 1} (sigma {s[step]:.6g}) would see stages {seen} "
            f"instead of stage {step_stage[step] + 1}; please report this schedule"
        )
    return plan


def _thresholds(s: list, step_stage: list, percent_to_sigma, log_position: float) -> dict:
    """{boundary step b: (percent, its σ)} for every step b where the stage changes (between steps b-1 and b)."""
    thresholds = {}
    for b in range(1, len(s) - 1):
        if step_stage[b] == step_stage[b - 1]:
            continue
        high, low = s[b - 1], s[b]
        if not high > low:
            raise MultistageError(
                f"steps {b} and {b + 1} are both evaluated at sigma {high:.6g} (the schedule repeats a sigma), "
                f"so no conditioning range can switch prompts between them; move that stage boundary by one step "
                f"or use a scheduler without repeated sigmas"
            )
        target = boundary_target(high, low, log_position)
        p = invert_percent(percent_to_sigma, low, high, target)
        if p is None:
            raise MultistageError(
                f"the model's percent_to_sigma never lands strictly between sigma {high:.6g} (step {b}) and "
                f"{low:.6g} (step {b + 1}), so no start/end percent can switch prompts there; this schedule lies "
                f"outside what this model's sampling can map (non-discrete or mismatched model sampling)"
            )
        thresholds[b] = (p, float(percent_to_sigma(p)))
    return thresholds


def _stage_ranges(counts: list, thresholds: dict, n: int, percent_to_sigma) -> list:
    """One StagePlan per stage: the first starts at percent 0, the last ends at 1, the others at thresholds."""
    stages = []
    first = 0
    for k, c in enumerate(counts):
        stop = first + c
        if c == 0:
            stages.append(StagePlan(k, 0, first, stop, None, None, None, None))
            continue
        if first == 0:
            sp, ss = 0.0, float(percent_to_sigma(0.0))
        else:
            sp, ss = thresholds[first]
        if stop == n:
            ep, es = 1.0, float(percent_to_sigma(1.0))
        else:
            ep, es = thresholds[stop]
        stages.append(StagePlan(k, c, first, stop, sp, ep, ss, es))
        first = stop
    return stages


def _gates(plan: MultistagePlan, percent_to_sigma: Callable[[float], float]) -> list:
    """(stage, start σ, end σ) as ComfyUI derives them from the percents, rounded to float32."""
    return [(st.index, _f32(float(percent_to_sigma(st.start_percent))), _f32(float(percent_to_sigma(st.end_percent))))
            for st in plan.stages if st.steps]


def active_stages(plan: MultistagePlan, sigma: float, percent_to_sigma: Callable[[float], float],
                  gates: Optional[list] = None) -> list:
    """Stages ComfyUI would use at ``sigma`` (its gating rule: end σ <= σ <= start σ, both inclusive)."""
    s32 = _f32(sigma)
    gates = _gates(plan, percent_to_sigma) if gates is None else gates
    return [k for k, start, end in gates if not (s32 > start or s32 < end)]


def verify_plan(plan: MultistagePlan, percent_to_sigma: Callable[[float], float]) -> list:
    """Steps whose σ would not see exactly their planned stage: list of (step, active stages)."""
    gates = _gates(plan, percent_to_sigma)
    bad = []
    for i in range(plan.num_steps):
        seen = active_stages(plan, plan.sigmas[i], percent_to_sigma, gates)
        if seen != [plan.step_stage[i]]:
            bad.append((i, seen))
    return bad


def format_plan(plan: MultistagePlan, labels: Sequence[str], header: str = "", per_step: bool = True) -> str:
    """The step table the node prints: one line per stage, then step -> stage (1-based steps)."""
    lines = []
    if header:
        lines.append(header)
    lines.append(f"{'stage':>5}  {'steps':>5}  {'step range':>10}  {'sigma range':>19}  {'percent range':>17}  prompt")
    for st in plan.stages:
        label = labels[st.index] if st.index < len(labels) else f"stage {st.index + 1}"
        label = label.replace("\n", " ")
        if len(label) > 60:
            label = label[:57] + "..."
        if st.steps == 0:
            lines.append(f"{st.index + 1:>5}  {0:>5}  {'-':>10}  {'-':>19}  {'(not used)':>17}  {label}")
            continue
        rng = f"{st.first_step + 1}-{st.stop_step}" if st.steps > 1 else f"{st.first_step + 1}"
        sig = f"{plan.sigmas[st.first_step]:.4g} .. {plan.sigmas[st.stop_step - 1]:.4g}"
        pct = f"{st.start_percent:.5f}-{st.end_percent:.5f}"
        lines.append(f"{st.index + 1:>5}  {st.steps:>5}  {rng:>10}  {sig:>19}  {pct:>17}  {label}")
    if per_step:
        lines.append("")
        lines.append(f"{'step':>4}  {'sigma':>10}  stage")
        for i in range(plan.num_steps):
            lines.append(f"{i + 1:>4}  {plan.sigmas[i]:>10.5g}  {plan.step_stage[i] + 1}")
    return "\n".join(lines)


def parse_stage_lines(text: str) -> list:
    """Parse the text mode: one stage per line, ``<steps>: <prompt>``; blank lines and ``#`` comments skipped.

    Returns a list of (steps, prompt). The prompt is everything after the first colon, stripped.
    """
    stages = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, prompt = line.partition(":")
        head = head.strip()
        if not sep:
            raise MultistageError(
                f"line {lineno} ({line[:40]!r}) has no step count; write one stage per line as `8: A Chinese dragon`"
            )
        try:
            value = float(head)
        except ValueError:
            raise MultistageError(
                f"line {lineno}: {head!r} before the colon is not a step count; write `8: A Chinese dragon`"
            ) from None
        if not math.isfinite(value) or value != int(value):
            raise MultistageError(f"line {lineno}: step count {head} is not a whole number of steps")
        if value < 0:
            raise MultistageError(f"line {lineno}: step count {head} is negative; use 0 to skip a stage")
        prompt = prompt.strip()
        if not prompt:
            raise MultistageError(f"line {lineno}: the prompt after `{head}:` is empty; every stage needs a prompt")
        stages.append((int(value), prompt))
    if not stages:
        raise MultistageError("no stages given; write one stage per line, e.g. `8: A Chinese dragon` then `12: A fish`")
    return stages


# ----------------------------------------------------------------------------------------- what the nodes call
@dataclass(frozen=True)
class Schedule:
    """What a node learns from the host before planning: the σ the sampler evaluates and the model's map.

    ``where`` says how the schedule was made (for the table and for messages); ``asked_steps`` is the
    node's steps input when the schedule came from sampler/scheduler/steps/denoise (None for a SIGMAS input),
    so a scheduler that runs another number of steps than asked can be named in the error.
    """

    sigmas: tuple
    percent_to_sigma: Optional[Callable[[float], float]]
    sampling_name: str = "model sampling"
    where: str = "custom SIGMAS input"
    asked_steps: Optional[int] = None
    scheduler: str = ""
    denoise: float = 1.0

    @classmethod
    def custom(cls, sigmas, percent_to_sigma, sampling_name) -> "Schedule":
        """A SIGMAS input (a tensor or any sequence of numbers) as given."""
        return cls(_floats(sigmas), percent_to_sigma, sampling_name)

    @classmethod
    def from_settings(cls, sigmas, percent_to_sigma, sampling_name, sampler_name, scheduler, steps,
                      denoise) -> "Schedule":
        """The schedule the stock KSampler computed for these settings."""
        where = f"{sampler_name}, {scheduler}, steps {steps}, denoise {denoise:g}"
        return cls(_floats(sigmas), percent_to_sigma, sampling_name, where, int(steps), scheduler, float(denoise))


def _floats(values) -> tuple:
    if hasattr(values, "flatten"):  # a tensor (no torch import here)
        values = values.flatten().tolist()
    return tuple(float(v) for v in values)


def check_sampler_choice(sampler_name, scheduler, samplers, schedulers):
    """Refuse a sampler or scheduler ComfyUI does not know (its KSampler would silently use another one)."""
    if sampler_name not in samplers:
        raise MultistageError(f"Multistage: unknown sampler {sampler_name!r}; pick one of the sampler list")
    if scheduler not in schedulers:
        raise MultistageError(f"Multistage: unknown scheduler {scheduler!r}; pick one of {list(schedulers)}")


def checked_percent_to_sigma(schedule: Schedule) -> Callable[[float], float]:
    """The model's percent -> σ map, refused when missing or not decreasing (no exact range is possible)."""
    fn, name = schedule.percent_to_sigma, schedule.sampling_name
    if fn is None:
        raise MultistageError(f"Multistage: this model's sampling ({name}) has no percent_to_sigma, so step ranges "
                              "cannot be mapped to ComfyUI conditioning ranges")
    probe = [float(fn(p / 16.0)) for p in range(1, 16)]
    if any(b > a for a, b in zip(probe, probe[1:])) or probe[0] == probe[-1]:
        raise MultistageError(f"Multistage: this model's sampling ({name}) maps percent to sigma non-monotonically "
                              f"({probe[0]:.4g} .. {probe[-1]:.4g}), so exact step ranges cannot be computed")
    return fn


def plan_multistage(schedule: Schedule, counts: Sequence, labels: Sequence[str], scale: bool = False):
    """(plan, step table) for stages of ``counts`` steps on ``schedule``, before any prompt is encoded (so bad
    input fails fast). ``scale`` spreads counts that do not sum to the steps run (see check_stage_steps)."""
    sig = list(schedule.sigmas)
    n = len(sig) - 1
    if n < 1:
        raise MultistageError(f"Multistage: the sampler would run no step ({schedule.where}); raise steps or denoise")
    note = ""
    if schedule.asked_steps is not None and n != schedule.asked_steps:
        note = (f" (ComfyUI's {schedule.scheduler} scheduler turns steps={schedule.asked_steps} into {n} sampling "
                f"steps{' at this denoise' if schedule.denoise < 0.9999 else ''})")
    try:
        final_counts = check_stage_steps(counts, n, scale=scale)
    except MultistageError as e:
        raise MultistageError(f"Multistage: {e}{note}") from None
    p2s = checked_percent_to_sigma(schedule)
    try:
        plan = plan_stages(sig, final_counts, p2s)
    except MultistageError as e:
        raise MultistageError(f"Multistage ({schedule.sampling_name}, {schedule.where}): {e}") from None
    header = f"Multistage plan: {n} steps ({schedule.where}); model sampling {schedule.sampling_name}{note}"
    if list(final_counts) != [int(c) for c in counts]:
        header += f"\nstage steps scaled from {list(counts)} to {final_counts}"
    return plan, format_plan(plan, labels, header)


def plan_stage_text(text: str, schedule: Schedule, scale: bool = False):
    """The text mode (``8: A Chinese dragon`` per line): (stage prompts, plan, step table)."""
    try:
        parsed = parse_stage_lines(text)
    except MultistageError as e:
        raise MultistageError(f"Multistage: {e}") from None
    texts = [p for _, p in parsed]
    plan, table = plan_multistage(schedule, [c for c, _ in parsed], texts, scale)
    return texts, plan, table


def collect_stages(previous, given) -> tuple:
    """A stage list: ``previous`` stages, then the connected (conditioning, steps) pairs of ``given`` as
    (conditioning, steps, label). An unconnected conditioning must have 0 steps."""
    stages = list(previous or ())
    for k, (cond, n) in enumerate(given, 1):
        if cond is None:
            if n:
                raise MultistageError(f"Stage list: steps_{k} is {n} but conditioning_{k} is not connected; connect "
                                      f"it or set steps_{k} to 0")
            continue
        stages.append((cond, int(n), f"stage {len(stages) + 1} (conditioning_{k})"))
    return tuple(stages)


def check_no_range(cond, what: str):
    """Refuse a conditioning that already carries a timestep range: the plan sets the ranges itself."""
    for entry in cond:
        d = entry[1]
        if d.get("start_percent", 0.0) != 0.0 or d.get("end_percent", 1.0) != 1.0:
            raise MultistageError(
                f"Multistage: {what} already has a timestep range (start_percent={d.get('start_percent', 0.0)}, "
                f"end_percent={d.get('end_percent', 1.0)}); remove ConditioningSetTimestepRange before this node, "
                "the node sets the ranges itself")


def plan_stage_list(stages, schedule: Schedule, scale: bool = False):
    """A stage list (see :func:`collect_stages`): (stage conditionings, plan, step table)."""
    if not stages:
        raise MultistageError("Multistage: the stage list is empty; connect at least one conditioning")
    for cond, _, label in stages:
        check_no_range(cond, label)
    plan, table = plan_multistage(schedule, [n for _, n, _ in stages], [label for _, _, label in stages], scale)
    return [c for c, _, _ in stages], plan, table


def plan_prompt_editing(text: str, counting: str, schedule: Schedule):
    """AUTOMATIC1111 prompt editing on the steps the sampler runs: (the prompt of every stage, plan, table)."""
    n = len(schedule.sigmas) - 1
    if n < 1:
        raise MultistageError("Prompt editing: the sampler would run no step; raise steps or denoise")
    try:
        stages = editing.prompt_stages(text, n, counting)
    except editing.PromptEditingError as e:
        raise MultistageError(f"Prompt editing: {e}") from None
    texts = [t for t, _ in stages]
    plan, table = plan_multistage(schedule, [c for _, c in stages], [repr(t) for t in texts])
    return texts, plan, table
