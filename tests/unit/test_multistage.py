"""Multistage plans: boundary maths, coverage and bad input (samplers/multistage.py).

``SD15Discrete`` re-derives ComfyUI's ``ModelSamplingDiscrete.percent_to_sigma`` from its definition
(SD1.5 linear-beta schedule, p -> sigma((1-p)*999) with log-linear interpolation, float32 like the
host) so the gating rule (active iff end σ <= σ <= start σ) can be checked without ComfyUI.
"""
import math

import pytest
import torch

from atelier.samplers import multistage as ms


class SD15Discrete:
    """σ(t) of SD1.x: betas linear in sqrt between 0.00085 and 0.012 over 1000 steps, ᾱ = Π(1-β)."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - ac) / ac) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    def sigma(self, t):
        t = torch.clamp(t.float(), min=0, max=len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def percent_to_sigma(self, p):
        if p <= 0.0:
            return 999999999.9
        if p >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - p) * 999.0)).item()

    @property
    def sigma_min(self):
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        return float(self.sigmas[-1])

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)


MODEL = SD15Discrete()


def karras(n, smin, smax, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]).tolist()


def exponential(n, smin, smax):
    return torch.cat([torch.linspace(math.log(smax), math.log(smin), n).exp(), torch.zeros(1)]).tolist()


def normal(n):
    """Uniform in model time from t(σ_max) to t(σ_min), sampled through σ(t), then 0."""
    start = MODEL.timestep(torch.tensor(MODEL.sigma_max))
    end = MODEL.timestep(torch.tensor(MODEL.sigma_min))
    ts = torch.linspace(float(start), float(end), n)
    return torch.tensor([float(MODEL.sigma(t)) for t in ts] + [0.0]).tolist()


def simple(n):
    ss = len(MODEL.sigmas) / n
    return torch.tensor([float(MODEL.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0]).tolist()


def kl_optimal(n):
    """Uniform in atan(σ) from σ_max to σ_min, then 0."""
    w = torch.arange(n, dtype=torch.float) / max(n - 1, 1)
    s = (w * math.atan(MODEL.sigma_min) + (1 - w) * math.atan(MODEL.sigma_max)).tan()
    return torch.cat([s, torch.zeros(1)]).tolist()


def ddim_uniform(n):
    """CompVis' uniform DDIM timesteps 1, 1+c, 1+2c, ... (c = 1000 // n), highest first, then 0."""
    c = max(1000 // n, 1)
    return [float(MODEL.sigmas[t]) for t in range(1, 1000, c)][::-1] + [0.0]


SCHEDULES = {
    "kl_optimal": kl_optimal,
    "ddim_uniform": ddim_uniform,
    "karras": lambda n: karras(n, MODEL.sigma_min, MODEL.sigma_max),
    "exponential": lambda n: exponential(n, MODEL.sigma_min, MODEL.sigma_max),
    "normal": normal,
    "simple": simple,
}


def gate(plan, sigma):
    """ComfyUI's rule, written out: skip if σ > start σ or σ < end σ (float32 comparisons)."""
    s = torch.tensor(sigma, dtype=torch.float32)
    out = []
    for st in plan.stages:
        if st.steps == 0:
            continue
        start = MODEL.percent_to_sigma(st.start_percent)
        end = MODEL.percent_to_sigma(st.end_percent)
        if not (bool(s > start) or bool(s < end)):
            out.append(st.index)
    return out


def split(n, k):
    base = [n // k] * k
    for i in range(n % k):
        base[i] += 1
    return base


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_step_sees_exactly_its_stage(name):
    checked = 0
    for steps in (2, 3, 7, 20, 33, 60):
        sig = SCHEDULES[name](steps)
        n = len(sig) - 1  # ddim_uniform may run a step more than asked, as in ComfyUI
        for counts in ([n], split(n, 2), split(n, 3), [0] + split(n, 2) + [0]):
            plan = ms.plan_stages(sig, counts, MODEL.percent_to_sigma)
            expected = [k for k, c in enumerate(counts) for _ in range(c)]
            assert list(plan.step_stage) == expected
            for i in range(n):
                assert gate(plan, sig[i]) == [expected[i]], (name, n, counts, i)
                checked += 1
    assert checked > 0


def test_boundary_sits_strictly_between_neighbouring_sigmas_on_uniform_schedule():
    sig = torch.linspace(10.0, 0.5, 11).tolist() + [0.0]
    plan = ms.plan_stages(sig, [4, 3, 4], MODEL.percent_to_sigma)
    s1, s2 = plan.stages[1], plan.stages[2]
    # stage 2 owns steps 5..7 (0-based 4..6); its start threshold lies between σ_3 and σ_4
    assert sig[4] < MODEL.percent_to_sigma(s1.start_percent) < sig[3]
    assert sig[7] < MODEL.percent_to_sigma(s1.end_percent) < sig[6]
    assert s1.end_percent == s2.start_percent
    target = ms.boundary_target(sig[3], sig[4])
    assert math.isclose(MODEL.percent_to_sigma(s1.start_percent), target, rel_tol=1e-4)
    # the aim is the weighted geometric mean, a quarter of the log gap above the lower σ
    assert math.isclose(math.log(target), 0.75 * math.log(sig[4]) + 0.25 * math.log(sig[3]))
    assert plan.stages[0].start_percent == 0.0 and plan.stages[-1].end_percent == 1.0


def test_geometric_mean_position_also_exact():
    sig = karras(20, MODEL.sigma_min, MODEL.sigma_max)
    plan = ms.plan_stages(sig, [8, 12], MODEL.percent_to_sigma, log_position=0.5)
    thr = MODEL.percent_to_sigma(plan.stages[0].end_percent)
    assert math.isclose(thr, math.sqrt(sig[7] * sig[8]), rel_tol=1e-4)
    assert [gate(plan, s)[0] for s in sig[:-1]] == [0] * 8 + [1] * 12


def test_naive_step_fraction_is_wrong_for_karras_but_plan_is_right():
    """Why the node exists: start_percent = 8/20 is not step 9 on a karras schedule."""
    sig = karras(20, MODEL.sigma_min, MODEL.sigma_max)
    wrong = 0
    for a in range(1, 20):
        naive = MODEL.percent_to_sigma(a / 20)
        wrong += next(i for i, s in enumerate(sig) if s < naive) != a
    assert wrong > 0
    plan = ms.plan_stages(sig, [8, 12], MODEL.percent_to_sigma)
    assert [gate(plan, s) for s in sig[:-1]] == [[0]] * 8 + [[1]] * 12


def test_zero_step_stages_get_no_range_and_do_not_break_coverage():
    sig = normal(20)
    for x in range(21):  # the Fig. 5 sweep 0/20 ... 20/0
        plan = ms.plan_stages(sig, [x, 20 - x], MODEL.percent_to_sigma)
        assert [s.steps for s in plan.stages] == [x, 20 - x]
        for st in plan.stages:
            assert (st.start_percent is None) == (st.steps == 0)
        assert [gate(plan, s)[0] for s in sig[:-1]] == [0] * x + [1] * (20 - x)


def test_repeated_sigma_inside_a_stage_is_fine_but_at_a_boundary_is_an_error():
    sig = [14.0, 6.0, 2.0, 0.5, 0.1, 0.1, 0.0]  # a tail that repeats σ, as some custom schedules do
    plan = ms.plan_stages(sig, [3, 3], MODEL.percent_to_sigma)
    assert [gate(plan, s)[0] for s in sig[:-1]] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ms.MultistageError, match="both evaluated at sigma 0.1"):
        ms.plan_stages(sig, [5, 1], MODEL.percent_to_sigma)


def test_sigma_zero_before_the_end_and_at_the_end():
    sig = [3.0, 1.0, 0.0, 0.0]  # a step evaluated at σ = 0 (degenerate but legal)
    plan = ms.plan_stages(sig, [2, 1], MODEL.percent_to_sigma)
    assert [gate(plan, s) for s in sig[:-1]] == [[0], [0], [1]]
    plan = ms.plan_stages([3.0, 1.0, 0.0], [1, 1], MODEL.percent_to_sigma)
    assert plan.stages[1].end_percent == 1.0 and MODEL.percent_to_sigma(1.0) == 0.0


def test_sigmas_the_model_cannot_map_give_a_clear_error():
    sig = [400.0, 300.0, 200.0, 0.0]  # above SD1.5's sigma_max ≈ 14.6: percent_to_sigma saturates there
    with pytest.raises(ms.MultistageError, match="cannot map|never lands"):
        ms.plan_stages(sig, [1, 2], MODEL.percent_to_sigma)


@pytest.mark.parametrize("counts, total, message", [
    ([8, 11], 20, "sum to 19"),
    ([8, -1, 13], 20, "negative"),
    ([8.5, 11.5], 20, "whole number"),
    ([1, 1, 1, 1, 1], 4, "5 stages but only 4 steps"),
    ([], 4, "no stages"),
])
def test_bad_step_counts(counts, total, message):
    with pytest.raises(ms.MultistageError, match=message):
        ms.check_stage_steps(counts, total)


def test_scaling_only_when_asked_and_exact_sum():
    assert ms.check_stage_steps([8, 12], 20) == [8, 12]
    assert ms.check_stage_steps([8.0, 12.0], 20) == [8, 12]
    assert ms.check_stage_steps([2, 3], 20, scale=True) == [8, 12]
    assert ms.check_stage_steps([1, 1, 1], 20, scale=True) == [7, 7, 6]
    assert ms.check_stage_steps([0, 5], 7, scale=True) == [0, 7]
    with pytest.raises(ms.MultistageError, match="no step"):
        ms.check_stage_steps([1, 1, 1, 1, 1], 4, scale=True)


def test_schedule_checks():
    with pytest.raises(ms.MultistageError, match="rises"):
        ms.plan_stages([1.0, 2.0, 0.0], [1, 1], MODEL.percent_to_sigma)
    with pytest.raises(ms.MultistageError, match="no step"):
        ms.plan_stages([1.0], [1], MODEL.percent_to_sigma)


def test_parse_stage_lines():
    text = "# dragon then fish\n8: A Chinese dragon\n\n12 : A fish: koi, ink\n0: unused\n"
    assert ms.parse_stage_lines(text) == [(8, "A Chinese dragon"), (12, "A fish: koi, ink"), (0, "unused")]
    for bad, msg in [("A dragon", "no step count"), ("x: A dragon", "not a step count"),
                     ("2.5: A dragon", "whole number"), ("-1: A dragon", "negative"),
                     ("8:   ", "empty"), ("\n# only a comment\n", "no stages")]:
        with pytest.raises(ms.MultistageError, match=msg):
            ms.parse_stage_lines(bad)


def test_table_lists_stages_and_every_step():
    sig = normal(20)
    plan = ms.plan_stages(sig, [8, 12], MODEL.percent_to_sigma)
    table = ms.format_plan(plan, ["A Chinese dragon", "A fish"])
    lines = table.splitlines()
    assert "1-8" in lines[1] and "A Chinese dragon" in lines[1]
    assert "9-20" in lines[2] and "A fish" in lines[2]
    step_lines = [ln.split() for ln in lines[5:]]
    assert [int(r[2]) for r in step_lines] == [1] * 8 + [2] * 12


def test_invert_percent_returns_none_when_interval_is_unreachable():
    assert ms.invert_percent(MODEL.percent_to_sigma, 100.0, 200.0, 150.0) is None
    p = ms.invert_percent(MODEL.percent_to_sigma, 1.0, 2.0, 1.4)
    assert 1.0 < MODEL.percent_to_sigma(p) < 2.0


def test_flow_model_percent_to_sigma_also_maps():
    """A non-discrete (flow, shift 3) model: σ = shift·t / (1 + (shift-1)·t), t = 1 - p."""
    shift = 3.0

    def p2s(p):
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        t = 1.0 - p
        return shift * t / (1 + (shift - 1) * t)

    ts = torch.linspace(1, 0, 21).tolist()
    sig = [shift * t / (1 + (shift - 1) * t) for t in ts]
    plan = ms.plan_stages(sig, [8, 12], p2s)
    for i, s in enumerate(sig[:-1]):
        active = [st.index for st in plan.stages
                  if not (s > p2s(st.start_percent) or s < p2s(st.end_percent))]
        assert active == [0 if i < 8 else 1]


def test_verify_plan_reports_a_naive_plan():
    """The self-check is real: the naive 8/20 percent on karras fails it on the steps it misplaces."""
    import dataclasses

    sig = karras(20, MODEL.sigma_min, MODEL.sigma_max)
    plan = ms.plan_stages(sig, [5, 15], MODEL.percent_to_sigma)
    assert ms.verify_plan(plan, MODEL.percent_to_sigma) == []
    s0, s1 = plan.stages
    naive = dataclasses.replace(plan, stages=(dataclasses.replace(s0, end_percent=5 / 20),
                                              dataclasses.replace(s1, start_percent=5 / 20)))
    bad = ms.verify_plan(naive, MODEL.percent_to_sigma)
    expected_first_b = next(i for i, s in enumerate(sig) if s < MODEL.percent_to_sigma(5 / 20))
    assert expected_first_b != 5
    assert bad and all(step in range(min(5, expected_first_b), max(5, expected_first_b)) for step, _ in bad)


# ------------------------------------------------------------------ the front-ends the nodes call

def test_plan_multistage_names_the_scheduler_that_changed_the_step_count():
    """ddim_uniform-like: steps=6 asked, 7 run; the sum error says how many steps really run and why."""
    sig = normal(7)
    schedule = ms.Schedule.from_settings(torch.tensor(sig), MODEL.percent_to_sigma, "ModelSamplingDiscrete",
                                         "euler", "ddim_uniform", 6, 1.0)
    assert schedule.sigmas == tuple(sig) and schedule.where == "euler, ddim_uniform, steps 6, denoise 1"
    with pytest.raises(ms.MultistageError, match=r"sum to 6 .* runs 7 steps;.* \(ComfyUI's ddim_uniform "
                                                 r"scheduler turns steps=6 into 7 sampling steps\)"):
        ms.plan_multistage(schedule, [3, 3], ["a", "b"])
    plan, table = ms.plan_multistage(schedule, [3, 4], ["a", "b"])
    assert plan.step_stage == (0, 0, 0, 1, 1, 1, 1)
    assert table.splitlines()[0] == ("Multistage plan: 7 steps (euler, ddim_uniform, steps 6, denoise 1); model "
                                     "sampling ModelSamplingDiscrete (ComfyUI's ddim_uniform scheduler turns "
                                     "steps=6 into 7 sampling steps)")
    custom = ms.Schedule.custom(sig, MODEL.percent_to_sigma, "ModelSamplingDiscrete")
    assert "custom SIGMAS input" in ms.plan_multistage(custom, [3, 4], ["a", "b"])[1].splitlines()[0]


def test_plan_ranges_are_what_the_node_sets():
    sig = karras(10, MODEL.sigma_min, MODEL.sigma_max)
    plan, _ = ms.plan_multistage(ms.Schedule.custom(sig, MODEL.percent_to_sigma, "sd"), [4, 0, 6], ["a", "b", "c"])
    ranges = plan.ranges()
    assert [k for k, _ in ranges] == [0, 2]  # the zero-step stage is left out
    assert ranges[0][1]["start_percent"] == 0.0 and ranges[1][1]["end_percent"] == 1.0
    assert ranges[0][1]["end_percent"] == ranges[1][1]["start_percent"] == plan.stages[0].end_percent


def test_model_mapping_is_checked_before_planning():
    sig = karras(10, MODEL.sigma_min, MODEL.sigma_max)
    with pytest.raises(ms.MultistageError, match=r"\(Flux\) has no percent_to_sigma"):
        ms.plan_multistage(ms.Schedule.custom(sig, None, "Flux"), [10], ["a"])
    with pytest.raises(ms.MultistageError, match="non-monotonically"):
        ms.plan_multistage(ms.Schedule.custom(sig, lambda p: p, "odd"), [10], ["a"])
    with pytest.raises(ms.MultistageError, match="would run no step"):
        ms.plan_multistage(ms.Schedule.custom([1.0], MODEL.percent_to_sigma, "sd"), [1], ["a"])


def test_sampler_choice_must_be_known():
    ms.check_sampler_choice("euler", "karras", ["euler"], ["karras"])
    with pytest.raises(ms.MultistageError, match="unknown sampler 'eulr'"):
        ms.check_sampler_choice("eulr", "karras", ["euler"], ["karras"])
    with pytest.raises(ms.MultistageError, match=r"unknown scheduler 'karas'; pick one of \['karras'\]"):
        ms.check_sampler_choice("euler", "karas", ["euler"], ["karras"])


def test_collect_stages_labels_and_refuses_steps_without_conditioning():
    first = ms.collect_stages(None, [("c1", 4), ("c2", 6), (None, 0), (None, 0)])
    both = ms.collect_stages(first, [("c3", 10.0), (None, 0)])
    assert both == (("c1", 4, "stage 1 (conditioning_1)"), ("c2", 6, "stage 2 (conditioning_2)"),
                    ("c3", 10, "stage 3 (conditioning_1)"))
    with pytest.raises(ms.MultistageError, match="steps_3 is 2 but conditioning_3 is not connected"):
        ms.collect_stages(None, [("c1", 4), (None, 0), (None, 2)])
