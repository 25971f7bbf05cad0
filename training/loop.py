"""The training loop: ε/v-MSE, AdamW, text-encoder-then-joint stages, mixed precision, EMA, checkpoints.

Pure torch. The model arrives as two callables (``unet_fn(x_t, t, context)`` and ``encode_fn(captions)``)
plus named trainable parameters, so the loop runs the same on a toy module and on ComfyUI's SD1.x UNet.

Determinism: the noise and timesteps of step k come from a generator seeded with (seed, k) and drawn for the
whole *global* batch, and the batch of step k is a pure function of k (``BucketBatchSampler.batch_at``).
So a resumed run repeats exactly what a straight run does, and N ranks × batch B draw what 1 rank × batch
N·B draws.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..common.files import atomic_folder
from ..common.progress import NO_PROGRESS, Progress

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------- noise schedule and loss
def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """SD1.x's training schedule (``scaled_linear``), for toy models; the real run reads the model's own."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor
    prediction: str = "epsilon"  # or "v_prediction"

    def __post_init__(self):
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction must be epsilon or v_prediction, got {self.prediction!r}")

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def noisy_and_target(self, x0, noise, t):
        """x_t = √ᾱ·x0 + √(1−ᾱ)·ε and the regression target (ε, or v = √ᾱ·ε − √(1−ᾱ)·x0)."""
        ac = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *([1] * (x0.ndim - 1)))
        a, s = ac.sqrt(), (1 - ac).sqrt()
        x_t = a * x0 + s * noise
        target = noise if self.prediction == "epsilon" else a * noise - s * x0
        return x_t, target


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


# ---------------------------------------------------------------- helpers
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

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params):
        for k, p in named_params.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, named_params):
        for k, p in named_params.items():
            p.copy_(self.shadow[k].to(p.dtype))


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    lr_unet: float = 1e-4
    lr_text_encoder: float = 5e-5
    text_encoder_only_steps: int = 0   # > 0 trains the text encoder alone first, then jointly (as in "Creative
                                       # Painting with Latent Diffusion Models")
    weight_decay: float = 1e-2
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0          # 0 = no clipping
    mixed_precision: str = "no"         # no | bf16 | fp16
    ema_decay: float = 0.0              # 0 = off
    seed: int = 0
    checkpoint_every: int = 0           # 0 = only at the end / on interrupt
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        self.adam_betas = tuple(self.adam_betas)


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    losses: list = field(default_factory=list)
    checkpoint: str | None = None


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message says which file and what to do."""


# ---------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, unet_fn, encode_fn, schedule: NoiseSchedule,
                 params: dict[str, dict[str, torch.nn.Parameter]], latents: list[torch.Tensor],
                 captions: list[str], sampler, out_dir: str, device="cpu", on_step=None, run_info=None):
        self.cfg = cfg
        self.unet_fn = unet_fn
        self.encode_fn = encode_fn
        self.schedule = schedule
        self.params = {g: dict(ps) for g, ps in params.items() if ps}
        if cfg.text_encoder_only_steps > 0 and not self.params.get("te"):
            raise ValueError("a text-encoder-only stage needs text-encoder parameters (enable text-encoder training)")
        if not self.params:
            raise ValueError("nothing to train: no trainable parameters were given")
        self.latents = latents
        self.captions = captions
        self.sampler = sampler
        self.out_dir = out_dir
        self.device = torch.device(device)
        self.on_step = on_step
        self.run_info = run_info or {}
        self.step = 0
        self.rank, self.world = _dist_info()
        lrs = {"unet": cfg.lr_unet, "te": cfg.lr_text_encoder}
        self.group_names = sorted(self.params)  # stable order of param groups
        self.optimizer = torch.optim.AdamW(
            [{"params": [self.params[g][k] for k in sorted(self.params[g])], "lr": lrs[g], "name": g}
             for g in self.group_names],
            betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, foreach=False)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        self.ema = EMA(self.flat_params(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self._stop = threading.Event()
        self._context_cache = {}

    # -- parameters
    def flat_params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{g}.{k}": p for g in self.group_names for k, p in self.params[g].items()}

    def stage(self, step: int) -> str:
        return "text_encoder" if step < self.cfg.text_encoder_only_steps else "joint"

    def _set_stage(self, stage: str):
        for g, ps in self.params.items():
            on = g == "te" or stage == "joint"
            for p in ps.values():
                p.requires_grad_(on)

    # -- one step
    def train_step(self) -> float:
        """One optimiser step on the batch of ``self.step``; returns the loss (averaged over ranks)."""
        cfg = self.cfg
        self._set_stage(self.stage(self.step))
        x0, captions, noise, t = self._batch()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            context = self._context(captions)
            x_t, target = self.schedule.noisy_and_target(x0, noise, t)
            pred = self.unet_fn(x_t, t, context)
            loss = F.mse_loss(pred.float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step}: lower the learning rate or "
                                     "use --mixed-precision bf16/no")
        self._optimise(loss)
        self.step += 1
        value = loss.detach().float()
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def _batch(self):
        """(latents, captions, noise, timesteps) of this rank's share of step ``self.step``'s global batch."""
        global_batch, _ = self.sampler.batch_at(self.step)
        local = self.sampler.local(global_batch)
        x0 = torch.stack([self.latents[i] for i in local]).to(self.device, torch.float32)
        captions = [self.captions[i] for i in local]
        g = step_generator(self.cfg.seed, self.step)
        shape = (len(global_batch),) + tuple(x0.shape[1:])
        noise = torch.randn(shape, generator=g)
        t = torch.randint(0, self.schedule.num_timesteps, (len(global_batch),), generator=g)
        lo = self.rank * len(local)
        return x0, captions, noise[lo:lo + len(local)].to(self.device), t[lo:lo + len(local)].to(self.device)

    def _context(self, captions):
        """Text-encoder output for the captions; a frozen encoder encodes each caption once and keeps it."""
        if "te" in self.params:  # both stages train the text encoder when it has LoRA
            return self.encode_fn(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._context_cache]
        if missing:
            with torch.no_grad():
                for c, z in zip(missing, self.encode_fn(missing)):
                    self._context_cache[c] = z
        return torch.stack([self._context_cache[c] for c in captions])

    def _optimise(self, loss):
        """Backward, gradient averaging over ranks, clipping, the (scaled) optimiser step and the EMA."""
        cfg = self.cfg
        self.scaler.scale(loss).backward()
        trainable = [p for p in self.flat_params().values() if p.requires_grad]
        if self.world > 1:
            _all_reduce_mean_grads(trainable)
        if cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.flat_params())

    # -- the loop
    def train(self, progress: Progress = NO_PROGRESS) -> TrainResult:
        """Run to ``cfg.steps``; Ctrl-C (or :meth:`request_stop`) ends between steps with a checkpoint saved.

        ``progress.update(step, steps)`` after every step; ``progress.check_interrupt()`` before it, and an
        exception it raises (the host's interrupt) is re-raised after the checkpoint is saved.
        """
        cfg = self.cfg
        losses = []
        restore = self._install_sigint()
        interrupted = False
        progress.update(self.step, cfg.steps)
        try:
            while self.step < cfg.steps:
                if self._stop_requested():
                    interrupted = True
                    break
                self._check_interrupt(progress)
                loss = self.train_step()
                losses.append(loss)
                if self.on_step is not None:
                    self.on_step(self.step, loss)
                progress.update(self.step, cfg.steps)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True  # raised outside our handler's reach (e.g. no main thread); state is between steps
        finally:
            restore()
        last_ckpt = self.save_checkpoint()
        if interrupted and self.rank == 0:
            print(f"\ninterrupted at step {self.step}/{cfg.steps}; saved {last_ckpt}. Continue with --resume.")
        return TrainResult(self.step, interrupted, losses, last_ckpt)

    def _check_interrupt(self, progress):
        """The host's interrupt ends the run between steps like Ctrl-C does, with the state saved first."""
        try:
            progress.check_interrupt()
        except BaseException:
            self.save_checkpoint()
            raise

    def request_stop(self):
        self._stop.set()

    def _stop_requested(self) -> bool:
        stop = self._stop.is_set()
        if self.world > 1:  # every rank must stop at the same step
            import torch.distributed as dist
            flag = torch.tensor([1.0 if stop else 0.0], device=_comm_device(self.device))
            dist.all_reduce(flag)
            stop = bool(flag.item() > 0)
        return stop

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop.is_set():  # second Ctrl-C: stop now
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            print("\nCtrl-C: finishing this step, saving a checkpoint (press again to abort without saving)")
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    # -- checkpoints
    def checkpoint_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def save_checkpoint(self) -> str | None:
        """``checkpoints/step-NNNNNN/{state.safetensors,state.json}``, built in a temp folder then renamed.

        Only rank 0 writes. On failure (disk full...) the temp folder is removed, earlier checkpoints stay,
        and a CheckpointError says where and why.
        """
        path = os.path.join(self.checkpoint_dir(), f"step-{self.step:06d}")
        if self.rank == 0:
            tensors, info = self.state_dict()
            write_checkpoint(path, tensors, info)
            self._prune()
        _barrier()
        return path

    def _prune(self):
        keep = self.cfg.keep_checkpoints
        if keep <= 0:
            return
        found = list_checkpoints(self.checkpoint_dir())
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def state_dict(self):
        tensors = {}
        for k, p in self.flat_params().items():
            tensors[f"param.{k}"] = p.detach().cpu().contiguous()
        opt = self.optimizer.state_dict()
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
            for k, v in self.ema.shadow.items():
                tensors[f"ema.{k}"] = v.cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        info = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": _jsonable(asdict(self.cfg)),
            "param_names": list(self.flat_params()),
            "optimizer": {"state": opt_state, "param_groups": _jsonable(opt["param_groups"])},
            "scaler": _jsonable(self.scaler.state_dict()),
            "run": _jsonable(self.run_info),
        }
        return tensors, info

    def load_checkpoint(self, path: str):
        tensors, info = read_checkpoint(path)
        names = list(self.flat_params())
        if info["param_names"] != names:
            missing = sorted(set(info["param_names"]) ^ set(names))
            raise CheckpointError(f"checkpoint {path} was made for different trainable parameters "
                                  f"({len(missing)} differ, e.g. {missing[:3]}); resume with the same model and "
                                  "LoRA settings")
        with torch.no_grad():
            for k, p in self.flat_params().items():
                p.copy_(tensors[f"param.{k}"].to(p.device, p.dtype))
        state = {}
        for idx, entry in info["optimizer"]["state"].items():
            state[int(idx)] = {n: (tensors[f"opt.{idx}.{n}"] if v == "tensor" else v) for n, v in entry.items()}
        groups = info["optimizer"]["param_groups"]
        for gr in groups:
            if "betas" in gr:
                gr["betas"] = tuple(gr["betas"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if info["scaler"]:
            self.scaler.load_state_dict(info["scaler"])
        if self.ema is not None:
            for k in self.ema.shadow:
                if f"ema.{k}" in tensors:
                    self.ema.shadow[k] = tensors[f"ema.{k}"].float().clone()
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            states = [tensors[f"rng.cuda.{i}"] for i in range(n) if f"rng.cuda.{i}" in tensors]
            if len(states) == n:
                torch.cuda.set_rng_state_all(states)
        self.step = int(info["step"])
        return info


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
                              f"{CHECKPOINT_FORMAT}")
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


# ---------------------------------------------------------------- distributed helpers
def _dist_info():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return 0, 1


def _comm_device(device):
    import torch.distributed as dist
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _barrier():
    rank, world = _dist_info()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _all_reduce_mean_grads(params):
    """Average gradients over ranks in one flat buffer (data parallel; same maths as DDP's reducer)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dev = _comm_device(flat.device)
    buf = flat.to(dev)
    dist.all_reduce(buf)
    buf = (buf / world).to(flat.device)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(buf[offset:offset + n].view_as(g).to(g.dtype))
        offset += n


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
