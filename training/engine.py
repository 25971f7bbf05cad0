"""The pack's trainer engine: one optimisation loop on HF ``accelerate``, shared by every trainer in the pack.

Model-agnostic. A trainer hands it

* an ``nn.Module`` whose ``forward(batch)`` returns the scalar loss of one local micro-batch (the engine wraps
  it with ``accelerator.prepare``: DDP over N processes, autocast for mixed precision),
* its trainable parameters as named groups, each with a learning rate (:class:`ParamGroup`),
* ``batch_fn(step, micro)`` giving this process's micro-batch ``micro`` of optimiser step ``step`` (a pure
  function of its arguments, so a resumed run repeats exactly what a straight run does),

and gets: the optimiser (:data:`OPTIMIZERS`), the LR schedule with warm-up (:data:`SCHEDULERS`), gradient
accumulation, gradient clipping, EMA, mixed precision (bf16, fp16 with loss scaling on GPUs), atomic resumable
checkpoints (safetensors + JSON, no pickle; bit-identical resume on one process), Ctrl-C that finishes the
step, saves and returns ``interrupted`` (the CLI exits 130), a loss log (TensorBoard event files and CSV under
``OUT/logs``), periodic validation and periodic hooks (every N steps or epochs), all reporting through a
``common.progress.Progress``. docs/training.md ("The trainer engine") documents the interface.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..common.files import atomic_folder, atomic_write
from ..common.progress import NO_PROGRESS, Progress

CHECKPOINT_FORMAT = 2
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("no", "bf16", "fp16")


class EngineError(ValueError):
    """A setting the engine cannot run with; the message says which and what to use instead."""


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message says which file and what to do."""


@dataclass
class EngineConfig:
    steps: int
    grad_accum: int = 1                 # micro-batches per optimiser step
    optimizer: str = "adamw"            # one of OPTIMIZERS
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "constant"         # one of SCHEDULERS
    warmup_steps: int = 0               # linear warm-up from 0 to the learning rate
    num_cycles: int = 1                 # restarts of cosine_with_restarts
    max_grad_norm: float = 1.0          # 0 = no clipping
    mixed_precision: str = "no"         # no | bf16 | fp16 (fp16: GPUs only, with loss scaling)
    ema_decay: float = 0.0              # 0 = off
    seed: int = 0
    checkpoint_every: int = 0           # 0 = only at the end / on interrupt
    keep_checkpoints: int = 2           # 0 = keep all
    validate_every: int = 0             # 0 = only at the end (when a val_fn is given)
    steps_per_epoch: int = 0            # for epoch hooks and the log's epoch column (0 = unknown)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check_int("steps", self.steps, 1, "train at least one step")
        _check_int("grad_accum", self.grad_accum, 1, "1 = no accumulation")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("num_cycles", self.num_cycles, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("keep_checkpoints", self.keep_checkpoints, 0)
        _check_int("validate_every", self.validate_every, 0)
        if self.optimizer not in OPTIMIZERS:
            raise EngineError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise EngineError(f"LR scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.mixed_precision not in PRECISIONS:
            raise EngineError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("weight_decay", "max_grad_norm", "ema_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise EngineError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.ema_decay >= 1:
            raise EngineError(f"ema_decay must be below 1 (e.g. 0.999), got {self.ema_decay}")


def _check_int(name, value, low, hint=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EngineError(f"{name} must be an integer >= {low}, got {value!r}" + (f" ({hint})" if hint else ""))


@dataclass
class ParamGroup:
    """Named trainable tensors sharing a learning rate (e.g. the UNet's LoRA factors)."""

    params: dict
    lr: float

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise EngineError(f"learning rate must be a finite number > 0, got {self.lr!r} (0 trains nothing, a "
                              "negative rate trains backwards)")


@dataclass
class Hook:
    """``fn(engine)`` every ``every`` steps (``unit="steps"``) or epochs (``unit="epochs"``), on the main process;
    ``at_end`` also runs it after the last step of a finished run."""

    every: int
    fn: Callable
    unit: str = "steps"
    at_end: bool = False
    name: str = ""

    def due(self, step: int, steps_per_epoch: int) -> bool:
        if self.every <= 0:
            return False
        period = self.every * (steps_per_epoch if self.unit == "epochs" else 1)
        return period > 0 and step % period == 0


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    losses: list = field(default_factory=list)
    checkpoint: str | None = None
    val_losses: dict = field(default_factory=dict)  # step -> validation loss


# ---------------------------------------------------------------- accelerate, optimiser, schedule
def make_accelerator(mixed_precision: str = "no", cpu: bool = False, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator`` for 1 process, or N processes / nodes when launched by ``accelerate launch``
    or ``torchrun`` (it reads their environment: NCCL on GPUs, gloo on CPUs).

    ``find_unused_parameters``: for trainers whose trainable set changes between steps (e.g. a text-encoder-only
    stage), so DDP does not wait for gradients that never come.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if mixed_precision not in PRECISIONS:
        raise EngineError(f"mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
    if mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise EngineError("fp16 mixed precision (with loss scaling) needs a CUDA GPU; on a CPU use bf16 or no")
    AcceleratorState._reset_state(reset_partial_state=False)  # a new run in the same process may change precision
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[kwargs])


def make_optimizer(name: str, groups: dict, cfg: EngineConfig):
    """The optimiser over ``{group: ParamGroup}`` (param groups in sorted group order, tensors in name order)."""
    pg = [{"params": [groups[g].params[k] for k in sorted(groups[g].params)], "lr": groups[g].lr, "name": g}
          for g in sorted(groups)]
    if name == "adamw":
        return torch.optim.AdamW(pg, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise EngineError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA GPUs); "
                              f"it is not importable here ({e}). Use adamw or adafactor") from None
        return bnb.optim.AdamW8bit(pg, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(pg, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise EngineError("--optimizer prodigy needs the prodigyopt package (pip install prodigyopt); "
                              "use adamw or adafactor") from None
        if len({g["lr"] for g in pg}) > 1:
            got = ", ".join(f"{g['name']} {g['lr']}" for g in pg)
            raise EngineError("Prodigy adapts the step size itself and needs one learning rate for every group "
                              f"(got {got}); give them all 1.0")
        return Prodigy(pg, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise EngineError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_scheduler(optimizer, cfg: EngineConfig):
    """Linear warm-up over ``warmup_steps``, then constant / linear decay to 0 / cosine to 0 / cosine with
    ``num_cycles`` hard restarts (transformers' schedules, stepped once per optimiser step)."""
    from transformers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    extra = {"num_cycles": cfg.num_cycles} if cfg.scheduler == "cosine_with_restarts" else None
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps,
                         scheduler_specific_kwargs=extra)


def enable_gradient_checkpointing(modules) -> int:
    """Recompute each module's activations in the backward pass (non-reentrant torch.utils.checkpoint)."""
    import torch.utils.checkpoint as cp

    n = 0
    for m in modules:
        if hasattr(m, "_atelier_orig_forward"):
            continue
        orig = m.forward

        def fwd(*args, __orig=orig, **kwargs):
            if not torch.is_grad_enabled():
                return __orig(*args, **kwargs)
            return cp.checkpoint(__orig, *args, use_reentrant=False, **kwargs)

        m._atelier_orig_forward = orig
        m.forward = fwd
        n += 1
    return n


class EMA:
    """Exponential moving average of the trainable tensors (kept in float32)."""

    def __init__(self, named_params: dict, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params):
        for k, p in named_params.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, named_params):
        for k, p in named_params.items():
            p.copy_(self.shadow[k].to(p.device, p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, named_params):
        """The EMA weights in the parameters for the ``with`` block, the live ones back afterwards."""
        live = {k: p.detach().clone() for k, p in named_params.items()}
        self.copy_to(named_params)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in named_params.items():
                    p.copy_(live[k])


# ---------------------------------------------------------------- loss log
class LossLog:
    """``logs/loss.csv`` (step, epoch, loss, lr per group, validation loss) and TensorBoard event files beside it.

    Resuming at step k first drops rows after k (the CSV is rewritten atomically; TensorBoard gets ``purge_step``),
    so the log of a resumed run reads like the one of a straight run.
    """

    def __init__(self, folder: str, groups: list[str], start_step: int = 0):
        self.folder = folder
        self.columns = ["step", "epoch", "loss"] + [f"lr_{g}" for g in groups] + ["val_loss", "time"]
        self.csv_path = os.path.join(folder, "loss.csv")
        os.makedirs(folder, exist_ok=True)
        rows = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, encoding="utf-8", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.csv_path, buf.getvalue())
        self._file = open(self.csv_path, "a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # the CSV is still written
            self.tb = None
        else:
            self.tb = SummaryWriter(folder, purge_step=start_step + 1 if start_step else None, flush_secs=30)

    def write(self, step: int, epoch: float, loss: float | None = None, lrs: dict | None = None,
              val_loss: float | None = None):
        row = {"step": step, "epoch": f"{epoch:.4f}", "loss": "" if loss is None else f"{loss:.6g}",
               "val_loss": "" if val_loss is None else f"{val_loss:.6g}", "time": f"{time.time():.3f}"}
        row.update({f"lr_{g}": f"{lr:.6g}" for g, lr in (lrs or {}).items()})
        self._csv.writerow(row)
        self._file.flush()
        if self.tb is not None:
            if loss is not None:
                self.tb.add_scalar("loss/train", loss, step)
            for g, lr in (lrs or {}).items():
                self.tb.add_scalar(f"lr/{g}", lr, step)
            if val_loss is not None:
                self.tb.add_scalar("loss/validation", val_loss, step)

    def close(self):
        self._file.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- the engine
class Engine:
    """One training run: ``train(progress)`` to ``cfg.steps``; ``load_checkpoint(path)`` first to resume."""

    def __init__(self, cfg: EngineConfig, accelerator, model: torch.nn.Module, groups: dict, batch_fn: Callable,
                 out_dir: str, *, val_fn: Callable | None = None, hooks=(), stage_fn: Callable | None = None,
                 on_step: Callable | None = None, run_info: dict | None = None, log: bool = True):
        self.cfg = cfg
        self.acc = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.groups = {g: ParamGroup(dict(pg.params), pg.lr) for g, pg in groups.items() if pg.params}
        if not self.groups:
            raise EngineError("nothing to train: no trainable parameters were given")
        self.group_names = sorted(self.groups)
        for p in self.flat_params().values():
            p.requires_grad_(True)  # DDP registers what requires grad when it wraps the model
        self.batch_fn, self.val_fn, self.stage_fn, self.on_step = batch_fn, val_fn, stage_fn, on_step
        self.hooks = list(hooks)
        self.out_dir = out_dir
        self.run_info = run_info or {}
        self._log_enabled = log
        self.raw_optimizer = make_optimizer(cfg.optimizer, self.groups, cfg)
        self.model, self.optimizer = accelerator.prepare(model, self.raw_optimizer)
        self.scheduler = make_scheduler(self.raw_optimizer, cfg)
        self.ema = EMA(self.flat_params(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self._stop = threading.Event()
        self.log = None

    # -- parameters and stages
    @property
    def params(self) -> dict:
        """{group: {name: tensor}}."""
        return {g: self.groups[g].params for g in self.group_names}

    def flat_params(self) -> dict:
        return {f"{g}.{k}": p for g in self.group_names for k, p in sorted(self.groups[g].params.items())}

    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def lrs(self) -> dict:
        return {pg["name"]: pg["lr"] for pg in self.raw_optimizer.param_groups}

    def epoch(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        return step / self.cfg.steps_per_epoch if self.cfg.steps_per_epoch else 0.0

    def _set_stage(self):
        """``stage_fn(step)`` names the groups that train at this step (None: all)."""
        active = self.stage_fn(self.step) if self.stage_fn is not None else None
        for g in self.group_names:
            on = active is None or g in active
            for p in self.groups[g].params.values():
                p.requires_grad_(on)

    # -- one optimiser step
    def train_step(self) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns the loss averaged over them and ranks."""
        cfg = self.cfg
        self._set_stage()
        total = torch.zeros((), device=self.acc.device)
        for micro in range(cfg.grad_accum):
            batch = self.batch_fn(self.step, micro)
            sync = micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else self.acc.no_sync(self.model)):
                loss = self.model(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}: lower the learning "
                                             "rate or use --mixed-precision bf16/no")
                self.acc.backward(loss / cfg.grad_accum)
            total += loss.detach().float()
        trainable = [p for p in self.flat_params().values() if p.requires_grad and p.grad is not None]
        if cfg.max_grad_norm > 0 and trainable:
            self.acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.flat_params())
        self.step += 1
        value = total / cfg.grad_accum
        if self.world > 1:
            value = self.acc.reduce(value, reduction="mean")
        return float(value)

    # -- the loop
    def train(self, progress: Progress = NO_PROGRESS) -> TrainResult:
        """Run to ``cfg.steps``; Ctrl-C (or :meth:`request_stop`) ends between steps with a checkpoint saved.

        ``progress.update(step, steps)`` after every step; ``progress.check_interrupt()`` before it, and an
        exception it raises (the host's interrupt) is re-raised after the checkpoint is saved.
        """
        cfg = self.cfg
        result = TrainResult(self.step, False)
        if self.is_main and self._log_enabled:
            self.log = LossLog(os.path.join(self.out_dir, "logs"), self.group_names, self.step)
        restore = self._install_sigint()
        progress.update(self.step, cfg.steps)
        try:
            while self.step < cfg.steps:
                if self._stop_requested():
                    result.interrupted = True
                    break
                self._check_interrupt(progress)
                lrs = self.lrs()
                loss = self.train_step()
                result.losses.append(loss)
                if self.log is not None:
                    self.log.write(self.step, self.epoch(), loss, lrs)
                if self.on_step is not None:
                    self.on_step(self.step, loss)
                progress.update(self.step, cfg.steps)
                self._periodic(result, final=False)
        except KeyboardInterrupt:
            result.interrupted = True  # raised outside our handler's reach (e.g. no main thread); between steps
        finally:
            restore()
        try:
            result.checkpoint = self.save_checkpoint()
            if not result.interrupted:
                self._periodic(result, final=True)
        finally:
            self._close_log()
        result.step = self.step
        if result.interrupted and self.is_main:
            print(f"\ninterrupted at step {self.step}/{cfg.steps}; saved {result.checkpoint}. Continue with --resume.")
        return result

    def _periodic(self, result, final: bool):
        """Validation, hooks and the periodic checkpoint after a step (``final``: after the last one)."""
        cfg, step = self.cfg, self.step
        due = final or (cfg.validate_every and step % cfg.validate_every == 0)
        if self.val_fn is not None and due and step not in result.val_losses:
            result.val_losses[step] = self.validate()
        for hook in self.hooks:
            if (hook.at_end if final else (hook.due(step, cfg.steps_per_epoch) and step < cfg.steps)):
                self.run_on_main(hook.fn, self)
        if not final and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            self.save_checkpoint()

    def validate(self) -> float:
        """``val_fn(model)`` on the unwrapped model without gradients, on the main process; logged."""
        value = self.run_on_main(self._validate)
        if self.log is not None:
            self.log.write(self.step, self.epoch(), val_loss=value)
        return value

    @torch.no_grad()
    def _validate(self):
        with self.acc.autocast():
            return float(self.val_fn(self.unwrapped()))

    def run_on_main(self, fn, *args):
        """``fn(*args)`` on the main process while the others wait; its result on the main process (None elsewhere)."""
        out = fn(*args) if self.is_main else None
        self.acc.wait_for_everyone()
        return out

    def _close_log(self):
        if self.log is not None:
            self.log.close()
            self.log = None

    def _check_interrupt(self, progress):
        """The host's interrupt ends the run between steps like Ctrl-C does, with the state saved first."""
        try:
            progress.check_interrupt()
        except BaseException:
            self.save_checkpoint()
            self._close_log()
            raise

    def request_stop(self):
        self._stop.set()

    def _stop_requested(self) -> bool:
        stop = self._stop.is_set()
        if self.world > 1:  # every rank must stop at the same step
            flag = torch.tensor([1.0 if stop else 0.0], device=self.acc.device)
            stop = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        return stop

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop.is_set():  # second Ctrl-C: stop now
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            if self.is_main:
                print("\nCtrl-C: finishing this step, saving a checkpoint (press again to abort without saving)")
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    # -- checkpoints
    def checkpoint_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def save_checkpoint(self) -> str:
        """``checkpoints/step-NNNNNN/{state.safetensors,state.json}``, built in a temp folder then renamed.

        Only the main process writes. On failure (disk full...) the temp folder is removed, earlier checkpoints
        stay, and a CheckpointError says where and why.
        """
        path = os.path.join(self.checkpoint_dir(), f"step-{self.step:06d}")
        if self.is_main:
            tensors, info = self.state_dict()
            write_checkpoint(path, tensors, info)
            self._prune()
        self.acc.wait_for_everyone()
        return path

    def _prune(self):
        keep = self.cfg.keep_checkpoints
        if keep > 0:
            for old in list_checkpoints(self.checkpoint_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def state_dict(self):
        tensors = {f"param.{k}": p.detach().cpu().contiguous() for k, p in self.flat_params().items()}
        opt = self.raw_optimizer.state_dict()
        opt_state = {}
        for idx, st in opt["state"].items():
            entry = {}
            for name, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{idx}.{name}"] = v.detach().cpu().contiguous()
                    entry[name] = "tensor"
                else:
                    entry[name] = v
            opt_state[str(idx)] = entry
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in self.ema.shadow.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else {}
        info = {
            "format": CHECKPOINT_FORMAT, "step": self.step, "config": _jsonable(asdict(self.cfg)),
            "param_names": list(self.flat_params()),
            "param_shapes": {k: list(p.shape) for k, p in self.flat_params().items()},
            "optimizer": {"state": opt_state, "param_groups": _jsonable(opt["param_groups"])},
            "scheduler": _jsonable(sched), "scaler": _jsonable(scaler), "run": _jsonable(self.run_info),
            "num_processes": self.world,
        }
        return tensors, info

    def load_checkpoint(self, path: str) -> dict:
        tensors, info = read_checkpoint(path)
        self._check_compatible(path, info)
        with torch.no_grad():
            for k, p in self.flat_params().items():
                p.copy_(tensors[f"param.{k}"].to(p.device, p.dtype))
        state = {int(idx): {n: (tensors[f"opt.{idx}.{n}"] if v == "tensor" else v) for n, v in entry.items()}
                 for idx, entry in info["optimizer"]["state"].items()}
        live = self.raw_optimizer.state_dict()["param_groups"]
        groups = [_like(saved, current) for saved, current in zip(info["optimizer"]["param_groups"], live)]
        self.raw_optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(dict(info["scheduler"], lr_lambdas=[None] * len(live)))
        if info["scaler"] and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(info["scaler"])
        if self.ema is not None:
            for k in self.ema.shadow:
                if f"ema.{k}" in tensors:
                    self.ema.shadow[k] = tensors[f"ema.{k}"].float().clone().to(self.ema.shadow[k].device)
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        self.step = int(info["step"])
        return info

    def _check_compatible(self, path, info):
        names = list(self.flat_params())
        if info["param_names"] != names:
            differ = sorted(set(info["param_names"]) ^ set(names))
            raise CheckpointError(f"checkpoint {path} was made for different trainable parameters ({len(differ)} "
                                  f"differ, e.g. {differ[:3]}); resume with the same model and settings (method, "
                                  "LoRA targets, text-encoder training)")
        shapes = info.get("param_shapes", {})
        for k, p in self.flat_params().items():
            if k in shapes and list(p.shape) != shapes[k]:
                raise CheckpointError(f"checkpoint {path} holds {k} with shape {tuple(shapes[k])}, this run has "
                                      f"{tuple(p.shape)}: it was made with other settings (e.g. another --rank). "
                                      "Resume with the settings it was made with, or start a new output folder")
        if len(info["optimizer"]["param_groups"]) != len(self.raw_optimizer.param_groups) or \
                info["config"].get("optimizer", "adamw") != self.cfg.optimizer:
            raise CheckpointError(f"checkpoint {path} was made with optimizer {info['config'].get('optimizer')!r}; "
                                  f"this run uses {self.cfg.optimizer!r}. Resume with the same --optimizer")


# ---------------------------------------------------------------- checkpoint files
def write_checkpoint(path: str, tensors: dict, info: dict) -> None:
    """The resumable state as a folder (state.safetensors + state.json), swapped in whole or not at all."""
    from safetensors.torch import save_file

    try:
        with atomic_folder(path) as tmp:
            save_file(tensors, os.path.join(tmp, "state.safetensors"))
            with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=1)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e}. Nothing half-written was left; "
                              "earlier checkpoints are intact. Free disk space and resume with --resume.") from e


def read_checkpoint(path: str):
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            info = json.load(f)
        tensors = load_file(os.path.join(path, "state.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from e
    if info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {info.get('format')}, this trainer reads "
                              f"{CHECKPOINT_FORMAT}: start a new output folder")
    return tensors, info


def list_checkpoints(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith("step-") and
                   os.path.exists(os.path.join(folder, n, "state.json")))
    return [os.path.join(folder, n) for n in names]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(os.path.join(out_dir, "checkpoints"))
    return found[-1] if found else None


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of step ``step`` (and an optional sub-stream): a pure function of its arguments."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream) % (2 ** 63))


def _like(saved, current):
    """A JSON-loaded value shaped like the live one (lists back to tuples, e.g. AdamW's betas)."""
    if isinstance(current, dict) and isinstance(saved, dict):
        return {k: _like(v, current.get(k)) for k, v in saved.items()}
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj  # non-finite floats stay floats: Python's json writes and reads Infinity and NaN
