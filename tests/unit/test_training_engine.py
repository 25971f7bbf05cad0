"""The trainer engine (accelerate) on the toy diffusion task: loss, stages, resume, Ctrl-C, checkpoint failures,
precision, optimisers, schedules, accumulation, logs, validation, hooks, and 2 processes against 1."""
import math
import os
import signal

import pytest
import torch


from atelier.training.diffusion import NoiseSchedule, scaled_linear_alphas_cumprod
from atelier.training.engine import (CheckpointError, EngineConfig, EngineError, Hook, enable_gradient_checkpointing,
                                     latest_checkpoint, make_accelerator)
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
    tr.cfg.steps = 2
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


def test_bf16_runs_and_resumes_and_fp16_needs_a_gpu(tmp_path):
    tr = make_trainer(tmp_path / "a", steps=3, mp="bf16", batch=2)
    res = tr.train()
    assert all(torch.isfinite(torch.tensor(res.losses)))
    straight = _state(tr)
    first = make_trainer(tmp_path / "b", steps=2, mp="bf16", batch=2)
    first.train()
    again = make_trainer(tmp_path / "b", steps=3, mp="bf16", batch=2)
    again.load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    again.train()
    assert all(torch.equal(straight[k], v) for k, v in _state(again).items())
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="fp16 mixed precision .* needs a CUDA GPU"):
            make_accelerator("fp16", cpu=True)


def test_engine_config_errors():
    with pytest.raises(EngineError, match="mixed_precision"):
        EngineConfig(steps=1, mixed_precision="fp8")
    with pytest.raises(EngineError, match="steps must be an integer >= 1"):
        EngineConfig(steps=0)
    with pytest.raises(EngineError, match="optimizer must be one of"):
        EngineConfig(steps=1, optimizer="sgd")
    with pytest.raises(EngineError, match="LR scheduler"):
        EngineConfig(steps=1, scheduler="step")
    with pytest.raises(ValueError, match="prediction"):
        NoiseSchedule(scaled_linear_alphas_cumprod(), "x0")
    from atelier.training.engine import ParamGroup
    for lr in (0, -1e-4, float("nan")):
        with pytest.raises(EngineError, match="learning rate must be a finite number > 0"):
            ParamGroup({}, lr)


@pytest.mark.parametrize("name,expected", [
    # warm-up 4 of 12 steps: lr·s/4 while s < 4, then the schedule over the 8 steps left
    ("constant", [0, .25, .5, .75] + [1] * 8),
    ("linear", [0, .25, .5, .75] + [(12 - s) / 8 for s in range(4, 12)]),
    ("cosine", [0, .25, .5, .75] + [0.5 * (1 + math.cos(math.pi * (s - 4) / 8)) for s in range(4, 12)]),
    ("cosine_with_restarts", [0, .25, .5, .75] + [0.5 * (1 + math.cos(math.pi * (((s - 4) / 8 * 2) % 1)))
                                                  for s in range(4, 12)]),
])
def test_warmup_and_schedule_values(tmp_path, name, expected):
    """The learning rate used at each step (before the step) equals the schedule's formula exactly."""
    seen = []
    tr = make_trainer(tmp_path, steps=12, scheduler=name, warmup_steps=4, num_cycles=2)
    tr.on_step = lambda step, loss: None
    for _ in range(12):
        seen.append(tr.lrs()["unet"] / 1e-2)
        tr.train_step()
    assert seen == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy", "adamw8bit"])
def test_optimizers_train_and_resume_or_say_what_is_missing(tmp_path, name):
    import importlib.util

    missing = {"prodigy": "prodigyopt", "adamw8bit": "bitsandbytes"}.get(name)
    if missing and importlib.util.find_spec(missing) is None:
        with pytest.raises(EngineError, match=f"needs {missing if missing != 'prodigyopt' else 'the prodigyopt'}"):
            make_trainer(tmp_path, steps=2, optimizer=name)
        return
    kw = {"lrs": (1.0, 1.0)} if name == "prodigy" else {}
    if name == "prodigy":
        with pytest.raises(EngineError, match="one learning rate for every group"):
            make_trainer(tmp_path / "p", steps=2, optimizer=name)
    tr = make_trainer(tmp_path / "a", steps=4, optimizer=name, **kw)
    before = {k: p.detach().clone() for k, p in tr.flat_params().items()}
    tr.train()
    assert any(not torch.equal(before[k], p) for k, p in tr.flat_params().items())
    first = make_trainer(tmp_path / "b", steps=2, optimizer=name, **kw)
    first.train()
    second = make_trainer(tmp_path / "b", steps=4, optimizer=name, **kw)
    second.load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    second.train()
    a, b = _state(tr), _state(second)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("param."))


def test_accumulating_micro_batches_equals_one_big_batch_in_gradients(tmp_path):
    """2 accumulated micro-batches of 1 give the gradients of one batch of 2 (same items, same noise)."""
    grads = []
    for batch, accum in ((2, 1), (1, 2)):
        tr = make_trainer(tmp_path / f"{batch}{accum}", steps=1, batch=batch, accum=accum, max_grad_norm=0.0)
        tr.optimizer.step = lambda: None  # keep the gradients: compare them, not the step
        tr.optimizer.zero_grad = lambda set_to_none=True: None
        tr.train_step()
        grads.append({k: p.grad.clone() for k, p in tr.flat_params().items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    one = make_trainer(tmp_path / "x", steps=3, batch=2)
    two = make_trainer(tmp_path / "y", steps=3, batch=1, accum=2)
    one.train(), two.train()
    for k, p in one.flat_params().items():
        torch.testing.assert_close(p, two.flat_params()[k], rtol=1e-5, atol=1e-6)


def test_ema_follows_its_formula(tmp_path):
    tr = make_trainer(tmp_path, steps=2, ema=0.5)
    shadow = {k: p.detach().clone() for k, p in tr.flat_params().items()}
    for _ in range(2):
        tr.train_step()
        shadow = {k: 0.5 * shadow[k] + 0.5 * p.detach() for k, p in tr.flat_params().items()}
    for k, v in tr.ema.shadow.items():
        torch.testing.assert_close(v, shadow[k])


def _events(folder):
    """(tag, step, value) of every scalar in the TensorBoard event files under ``folder`` (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(folder)):
        if "tfevents" not in name:
            continue
        data = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in ev.summary.value:
                out.append((v.tag, ev.step, v.simple_value))
    return out


def test_loss_log_csv_and_tensorboard_and_resume_truncates(tmp_path):
    import csv

    tr = make_trainer(tmp_path, steps=4, every=2)
    tr.val_fn = lambda task: 0.125
    tr.cfg.validate_every = 2
    res = tr.train()
    rows = list(csv.DictReader(open(tmp_path / "logs" / "loss.csv")))
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in train_rows] == pytest.approx(res.losses, rel=1e-5)
    assert [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]] == [(2, .125), (4, .125)]
    assert res.val_losses == {2: .125, 4: .125}
    ev = _events(tmp_path / "logs")
    assert [s for t, s, _ in ev if t == "loss/train"] == [1, 2, 3, 4]
    assert [v for t, _, v in ev if t == "loss/train"] == pytest.approx(res.losses, rel=1e-5)
    assert {t for t, _, _ in ev} >= {"loss/train", "loss/validation", "lr/unet", "lr/te"}
    again = make_trainer(tmp_path, steps=4)
    again.load_checkpoint(str(tmp_path / "checkpoints" / "step-000002"))
    again.train()
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "loss.csv")) if r["loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # steps 3 and 4 once, not twice


def test_hooks_every_steps_and_epochs_run_on_time(tmp_path):
    calls = []
    tr = make_trainer(tmp_path, steps=8, steps_per_epoch=4)
    tr.hooks = [Hook(3, lambda e: calls.append(("s", e.step))),
                Hook(1, lambda e: calls.append(("e", e.step)), unit="epochs"),
                Hook(5, lambda e: calls.append(("end", e.step)), at_end=True)]
    tr.train()
    assert calls == [("s", 3), ("e", 4), ("end", 5), ("s", 6), ("end", 8)]


@pytest.mark.slow
@pytest.mark.parametrize("te_steps", [0, 1])
def test_distributed_two_processes_equal_one_process_doubled_batch(tmp_path, te_steps):
    """accelerate over 2 CPU processes (gloo, DDP, batch 1 each) == 1 process with batch 2."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = str(tmp_path / "ddp.safetensors")
    mp.start_processes(ddp_worker, args=(2, port, str(tmp_path / "ddp"), result, 3, 1, te_steps),
                       nprocs=2, join=True, start_method="spawn")
    ddp = load_file(result)
    single = make_trainer(tmp_path / "single", steps=3, batch=2, te_steps=te_steps)
    single.train()
    initial = make_trainer(tmp_path / "x", steps=0).flat_params()
    moved = 0
    for k, p in single.flat_params().items():
        # float summation order differs (DDP's all-reduce vs one batch); AdamW steps are lr-sized (1e-2), so 1e-4
        # absolute is 1% of one step
        torch.testing.assert_close(ddp[k], p.detach(), rtol=1e-4, atol=1e-4)
        moved += int(not torch.equal(p.detach(), initial[k].detach()))
    assert moved > 0  # the comparison is between trained weights, not two copies of the initial ones
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["step-000003"]  # only rank 0 wrote
