"""The diffusion task's training features, each shown to change what it should: min-SNR-γ weights, noise offset,
caption dropout, tag shuffling, flip/crop draws, seeded LoRA initialisation, full-weight two-stage training."""
import pytest
import torch

from atelier.training.diffusion import (DiffusionOptions, NoiseSchedule, ValidationSet, scaled_linear_alphas_cumprod,
                                        shuffle_caption)
from atelier.training.engine import EngineError
from atelier.training.lora import TEXT_ENCODER_TARGETS, inject_lora
from atelier.tests.fixtures.training_toys import (CAPTIONS, ToyTextEncoder, ToyUNet, make_toy_trainer as make_trainer,
                                                  torch_threads)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_formula_per_timestep(prediction):
    sched = NoiseSchedule(scaled_linear_alphas_cumprod(), prediction)
    t = torch.arange(0, 1000, 37)
    ac = scaled_linear_alphas_cumprod()[t].double()
    snr = ac / (1 - ac)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + (prediction == "v_prediction"))
    torch.testing.assert_close(sched.min_snr_weights(t, 5.0).double(), expected, rtol=1e-6, atol=0)
    assert sched.min_snr_weights(torch.tensor([999]), 5.0).item() == pytest.approx(
        1.0 if prediction == "epsilon" else float(snr[-1] / (snr[-1] + 1)), rel=1e-5)  # low SNR: not clipped


def test_min_snr_weighting_scales_each_samples_loss(tmp_path):
    """The weighted loss is the mean of per-sample MSE × weight(t): computed here by hand from the same batch."""
    plain = make_trainer(tmp_path / "a", steps=1, batch=4)
    gamma = make_trainer(tmp_path / "b", steps=1, batch=4, options=DiffusionOptions(min_snr_gamma=0.1))
    batch = plain.task.batch(0)
    assert torch.equal(batch["noise"], gamma.task.batch(0)["noise"])
    unet, te = plain.toys
    with torch.no_grad():
        x_t, target = plain.schedule.noisy_and_target(batch["x0"], batch["noise"], batch["t"])
        per = ((unet(x_t, batch["t"], te(batch["captions"])) - target) ** 2).flatten(1).mean(1)
        w = plain.schedule.min_snr_weights(batch["t"], 0.1)
        assert plain.task(batch).item() == pytest.approx(per.mean().item(), rel=1e-5)
        assert gamma.task(batch).item() == pytest.approx((per * w).mean().item(), rel=1e-5)
    assert (w < 1).any()  # some timesteps really are down-weighted


def test_noise_offset_adds_the_stated_per_channel_shift(tmp_path):
    """noise = ε + offset·N(0,1) per sample and channel: the spatial mean of each channel then has variance
    1/(h·w) + offset² (here 1/64 + 0.25), against 1/64 without the offset."""
    def channel_means(options):
        tr = make_trainer(tmp_path, steps=1, batch=4, options=options)
        return torch.cat([tr.task.batch(s)["noise"].mean((2, 3)).flatten() for s in range(200)])

    plain, shifted = channel_means(DiffusionOptions()), channel_means(DiffusionOptions(noise_offset=0.5))
    assert plain.var().item() == pytest.approx(1 / 64, rel=0.15)
    assert shifted.var().item() == pytest.approx(1 / 64 + 0.25, rel=0.15)
    tr = make_trainer(tmp_path, steps=1, batch=4, options=DiffusionOptions(noise_offset=0.5))
    pixel = torch.cat([tr.task.batch(s)["noise"].flatten() for s in range(50)])
    assert pixel.var().item() == pytest.approx(1.25, rel=0.05)


def test_caption_dropout_rate_is_observed_over_many_batches(tmp_path):
    tr = make_trainer(tmp_path, steps=1, batch=4, options=DiffusionOptions(caption_dropout=0.3))
    caps = [c for s in range(500) for c in tr.task.batch(s)["captions"]]
    assert sum(c == "" for c in caps) / len(caps) == pytest.approx(0.3, abs=0.03)
    none = make_trainer(tmp_path, steps=1, batch=4)
    assert all(c for s in range(50) for c in none.task.batch(s)["captions"])


def test_tag_shuffling_keeps_the_first_n_and_permutes_the_rest():
    caption = "mnt, a painting by Claude Monet, water, boats, dusk, fog"
    seen = set()
    for seed in range(40):
        out = shuffle_caption(caption, 2, torch.Generator().manual_seed(seed))
        parts = out.split(", ")
        assert parts[:2] == ["mnt", "a painting by Claude Monet"]
        assert sorted(parts[2:]) == sorted(["water", "boats", "dusk", "fog"])
        seen.add(out)
    assert len(seen) > 10  # really shuffled
    assert shuffle_caption("a, b", 5, torch.Generator()) == "a, b"


def test_shuffled_captions_change_between_steps_and_repeat_on_resume(tmp_path):
    opts = DiffusionOptions(shuffle_tags=True, keep_tokens=1)
    tr = make_trainer(tmp_path, steps=1, batch=4, options=opts)
    tr.task.captions = ["a, b, c, d, e"] * 4
    caps = [tuple(tr.task.batch(s)["captions"]) for s in range(20)]
    assert all(c.startswith("a, ") for cs in caps for c in cs)
    assert len(set(caps)) > 5
    again = make_trainer(tmp_path, steps=1, batch=4, options=opts)
    again.task.captions = tr.task.captions
    assert [tuple(again.task.batch(s)["captions"]) for s in range(20)] == caps  # a pure function of the step


def test_flip_and_crop_draws_are_per_sample_and_seeded(tmp_path):
    from atelier.training.diffusion import LatentItem

    tr = make_trainer(tmp_path, steps=1, batch=4, options=DiffusionOptions(flip=True, random_crop=True))
    g = torch.Generator().manual_seed(0)
    tr.task.items = [LatentItem(torch.randn(4, 8, 12, generator=g), (8, 8), torch.randn(4, 8, 12, generator=g))
                     for _ in range(4)]
    views = set()
    for s in range(30):
        x0 = tr.task.batch(s)["x0"]
        assert x0.shape == (4, 4, 8, 8)
        for img in x0:
            hit = [(f, left) for f, src in ((0, None), (1, None)) for i in tr.task.items for left in range(5)
                   if torch.equal(img, (i.flipped if f else i.latent)[:, :, left:left + 8])]
            assert len(hit) == 1
            views.add(hit[0])
    assert {f for f, _ in views} == {0, 1} and len({left for _, left in views}) >= 4


def test_validation_set_is_fixed_and_unweighted(tmp_path):
    from atelier.training.diffusion import LatentItem

    tr = make_trainer(tmp_path, steps=3, options=DiffusionOptions(min_snr_gamma=1.0))
    items = [LatentItem(torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)), (8, 8)) for i in range(2)]
    val = ValidationSet(items, CAPTIONS[:2], tr.schedule, seed=0)
    assert len(val) == 8 and sorted(c[3] // 250 for c in val.cases) == [0, 0, 1, 1, 2, 2, 3, 3]
    first = val(tr.task)
    assert val(tr.task) == first  # same noise and timesteps every time
    tr.train()
    assert val(tr.task) != first  # moves when the model does


def test_lora_initialisation_is_seeded_and_independent_of_the_global_rng():
    def factors(seed, noise_before):
        torch.manual_seed(noise_before)
        torch.randn(100)  # whatever else the process drew before
        te = ToyTextEncoder(layers=2)
        mods = inject_lora(te, TEXT_ENCODER_TARGETS, rank=4, alpha=4.0, seed=seed)
        return {k: m.lora_down.weight.detach().clone() for k, m in mods.items()}

    a, b, c = factors(1, 0), factors(1, 5), factors(2, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert len({tuple(v.flatten()[:4].tolist()) for v in a.values()}) == len(a)  # modules differ from each other


def test_same_seed_runs_are_equal_from_the_first_step(tmp_path):
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # a different global RNG state each time
        tr = make_trainer(tmp_path / name, steps=3, seed=4)
        tr.train()
        runs.append({k: p.detach().clone() for k, p in tr.flat_params().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_full_weight_two_stage_training(tmp_path):
    """Full fine-tune, text encoder first with the UNet frozen, then both (as in "Creative Painting with Latent
    Diffusion Models"): stage 1 leaves every UNet weight untouched, stage 2 moves both."""
    tr = make_trainer(tmp_path, steps=4, te_steps=2, lora=False)
    unet0 = {k: p.detach().clone() for k, p in tr.params["unet"].items()}
    te0 = {k: p.detach().clone() for k, p in tr.params["te"].items()}
    seen = []
    tr.on_step = lambda step, loss: seen.append((step, {k: p.detach().clone() for k, p in tr.params["unet"].items()},
                                                 {k: p.detach().clone() for k, p in tr.params["te"].items()}))
    tr.train()
    for step, unet, te in seen:
        unet_moved = any(not torch.equal(unet0[k], v) for k, v in unet.items())
        te_moved = any(not torch.equal(te0[k], v) for k, v in te.items())
        assert te_moved
        assert unet_moved == (step > 2), step


def test_options_are_checked():
    with pytest.raises(EngineError, match="caption_dropout"):
        DiffusionOptions(caption_dropout=1.5)
    with pytest.raises(EngineError, match="noise_offset"):
        DiffusionOptions(noise_offset=-0.1)
    with pytest.raises(EngineError, match="keep_tokens"):
        DiffusionOptions(keep_tokens=-1)
