"""The training loop on toy modules: loss, stages, resume, Ctrl-C, checkpoint failures, precision."""
import os
import signal

import pytest
import torch


from atelier.training.loop import (CheckpointError, NoiseSchedule, TrainConfig, enable_gradient_checkpointing,
                           latest_checkpoint, scaled_linear_alphas_cumprod)
from atelier.tests.fixtures.progress import Interrupted, RecordingProgress
from atelier.tests.fixtures.training_toys import CAPTIONS, ddp_worker, make_toy_trainer as make_trainer, torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield



def fixed_eval_loss(tr):
    unet, te = tr.toys
    g = torch.Generator().manual_seed(99)
    x0 = torch.stack(tr.latents)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    with torch.no_grad():
        x_t, target = tr.schedule.noisy_and_target(x0, noise, t)
        return torch.nn.functional.mse_loss(unet(x_t, t, te(CAPTIONS)), target).item()


def test_loss_decreases_on_fixed_toy_batch(tmp_path):
    tr = make_trainer(tmp_path, steps=40, batch=4)
    before = fixed_eval_loss(tr)
    res = tr.train()
    after = fixed_eval_loss(tr)
    assert res.step == 40 and not res.interrupted
    assert after < 0.8 * before, (before, after)


def test_v_prediction_target_is_consistent():
    sched = NoiseSchedule(scaled_linear_alphas_cumprod(), "v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t, v = sched.noisy_and_target(x0, eps, t)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(a * x_t - s * v, x0)   # x0 = √ᾱ x_t − √(1−ᾱ) v
    torch.testing.assert_close(s * x_t + a * v, eps)  # ε = √(1−ᾱ) x_t + √ᾱ v
    x_t2, e = NoiseSchedule(sched.alphas_cumprod).noisy_and_target(x0, eps, t)
    assert torch.equal(x_t, x_t2) and torch.equal(e, eps)


def test_text_encoder_stage_freezes_unet(tmp_path):
    tr = make_trainer(tmp_path, steps=2, te_steps=2)
    unet_before = {k: p.detach().clone() for k, p in tr.params["unet"].items()}
    te_before = {k: p.detach().clone() for k, p in tr.params["te"].items()}
    tr.train()
    assert all(torch.equal(unet_before[k], p) for k, p in tr.params["unet"].items())
    assert any(not torch.equal(te_before[k], p) for k, p in tr.params["te"].items())
    tr.cfg.steps = 3  # joint stage moves the UNet too
    tr.train()
    assert any(not torch.equal(unet_before[k], p) for k, p in tr.params["unet"].items())


def _state(tr):
    sd, info = tr.state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("rng.")}


@pytest.mark.parametrize("kw", [dict(te_steps=2, ema=0.9), dict(lora=False, batch=2)])
def test_resume_is_bit_for_bit(tmp_path, kw):
    straight = make_trainer(tmp_path / "a", steps=6, **kw)
    straight.train()
    first = make_trainer(tmp_path / "b", steps=3, **kw)
    first.train()
    second = make_trainer(tmp_path / "b", steps=6, **kw)
    info = second.load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    assert info["step"] == 3 and second.step == 3
    second.train()
    a, b = _state(straight), _state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_and_resumes(tmp_path):
    def interrupt(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    tr = make_trainer(tmp_path / "b", steps=5, on_step=interrupt)
    res = tr.train()
    assert res.interrupted and res.step == 2
    assert os.path.basename(res.checkpoint) == "step-000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again
    resumed = make_trainer(tmp_path / "b", steps=5)
    resumed.load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    resumed.train()
    straight = make_trainer(tmp_path / "a", steps=5)
    straight.train()
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progress_counts_steps_and_a_host_interrupt_saves_before_it_propagates(tmp_path):
    tr = make_trainer(tmp_path / "a", steps=3)
    seen = RecordingProgress()
    tr.train(seen)
    assert seen.updates == [(0, 3), (1, 3), (2, 3), (3, 3)] and seen.checks == 3
    tr = make_trainer(tmp_path / "b", steps=5)
    with pytest.raises(Interrupted):
        tr.train(RecordingProgress(stop_at=3))
    assert tr.step == 2 and os.path.basename(latest_checkpoint(str(tmp_path / "b"))) == "step-000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_disk_full_during_checkpoint_write_leaves_no_half_file(tmp_path, monkeypatch):
    import safetensors.torch

    tr = make_trainer(tmp_path, steps=4, every=2)
    tr.train()
    good = latest_checkpoint(str(tmp_path))
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    tr.cfg.steps = 5
    with pytest.raises(CheckpointError, match="No space left.*Nothing half-written"):
        tr.train()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step-000002", "step-000004"]  # no step-000005, no temp folder
    assert latest_checkpoint(str(tmp_path)) == good
    fresh = make_trainer(tmp_path, steps=5)
    fresh.load_checkpoint(good)  # the earlier checkpoint is intact
    assert fresh.step == 4


def test_resume_refuses_other_parameters(tmp_path):
    tr = make_trainer(tmp_path, steps=1)
    tr.train()
    other = make_trainer(tmp_path, steps=1, lora=False)
    with pytest.raises(CheckpointError, match="different trainable parameters"):
        other.load_checkpoint(latest_checkpoint(str(tmp_path)))
    with pytest.raises(CheckpointError, match="cannot read"):
        other.load_checkpoint(str(tmp_path / "nope"))


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    grads = []
    for ckpt in (False, True):
        tr = make_trainer(tmp_path / str(ckpt), steps=1)
        unet, te = tr.toys
        if ckpt:
            assert enable_gradient_checkpointing([unet.block] + list(te.text_model.encoder.layers)) == 2
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        loss = unet(x, torch.tensor([10, 500]), te(CAPTIONS[:2])).pow(2).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in tr.flat_params().values()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mp", ["bf16", "fp16"])
def test_mixed_precision_runs_and_resumes(tmp_path, mp):
    tr = make_trainer(tmp_path, steps=3, mp=mp, batch=2)
    res = tr.train()
    assert all(torch.isfinite(torch.tensor(res.losses)))
    if mp == "fp16":
        assert tr.scaler.is_enabled()
        _, info = tr.state_dict()
        assert info["scaler"]["scale"] > 0
        again = make_trainer(tmp_path, steps=3, mp=mp, batch=2)
        again.load_checkpoint(latest_checkpoint(str(tmp_path)))
        assert again.scaler.get_scale() == tr.scaler.get_scale()


def test_trainer_config_errors(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="prediction"):
        NoiseSchedule(scaled_linear_alphas_cumprod(), "x0")


@pytest.mark.slow
def test_distributed_two_processes_equal_one_process_doubled_batch(tmp_path):
    """torch.distributed (gloo, 2 CPU processes, batch 1 each) == 1 process with batch 2."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    result = str(tmp_path / "ddp.safetensors")
    mp.start_processes(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), result, 3, 1),
                       nprocs=2, join=True, start_method="spawn")
    ddp = load_file(result)
    single = make_trainer(tmp_path / "single", steps=3, batch=2)
    single.train()
    moved = 0
    for k, p in single.flat_params().items():
        # float summation order differs (all-reduce vs one batch); AdamW steps are lr-sized (1e-2), so 1e-4
        # absolute is 1% of one step
        torch.testing.assert_close(ddp[k], p.detach(), rtol=1e-4, atol=1e-4)
        moved += int(not torch.equal(p.detach(), make_trainer(tmp_path / "x", steps=0).flat_params()[k].detach()))
    assert moved > 0  # the comparison is between trained weights, not two copies of the initial ones
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["step-000003"]  # only rank 0 wrote
