"""The latent-diffusion training task the artist trainer hands to the engine: ε/v-MSE with min-SNR-γ weighting,
noise offset, caption dropout, tag shuffling, flip and crop augmentation, and a held-out validation loss.

Pure torch. The model arrives as two callables (``unet_fn(x_t, t, context)`` and ``encode_fn(captions)``) and
the two modules that hold their weights (so the engine's DDP sees the trainable parameters), so the task runs
the same on a toy module and on ComfyUI's SD1.x UNet.

Determinism: everything random in optimiser step k (noise, timesteps, offsets, dropout, shuffles, flips, crops)
is drawn for the whole *global* batch of the step (batch × processes × accumulation) from a generator seeded
with (seed, k), and the batch of step k is a pure function of k (``BucketBatchSampler.batch_at``). So a resumed
run repeats exactly what a straight run does, N processes × batch B draw what 1 process × batch N·B draws, and
accumulating N micro-batches of B draws what one batch of N·B does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .engine import EngineError, step_generator


# ---------------------------------------------------------------- noise schedule
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

    def _ac(self, t, like):
        return self.alphas_cumprod.to(like.device)[t].float().view(-1, *([1] * (like.ndim - 1)))

    def noisy_and_target(self, x0, noise, t):
        """x_t = √ᾱ·x0 + √(1−ᾱ)·ε and the regression target (ε, or v = √ᾱ·ε − √(1−ᾱ)·x0)."""
        ac = self._ac(t, x0)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        x_t = a * x0 + s * noise
        target = noise if self.prediction == "epsilon" else a * noise - s * x0
        return x_t, target

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep."""
        ac = self.alphas_cumprod[t.cpu()].double()
        return (ac / (1 - ac)).float()

    def min_snr_weights(self, t, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.prediction == "v_prediction" else clipped / snr

    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t) per timestep (k-diffusion's parametrisation, what the pack's samplers use)."""
        ac = self.alphas_cumprod.double()
        return ((1 - ac) / ac).sqrt().float()


# ---------------------------------------------------------------- options and captions
@dataclass
class DiffusionOptions:
    min_snr_gamma: float = 0.0     # 0 = plain MSE; 5 is the paper's value
    noise_offset: float = 0.0      # adds offset · N(0, 1) per sample and channel to the noise
    caption_dropout: float = 0.0   # probability of training a sample with the empty caption
    shuffle_tags: bool = False     # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 0
    flip: bool = False             # mirror a sample with probability 1/2 (its mirrored latent is cached)
    random_crop: bool = False      # random window of the cached cover latent instead of the centre

    def __post_init__(self):
        for name, high in (("min_snr_gamma", math.inf), ("noise_offset", math.inf), ("caption_dropout", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= high:
                raise EngineError(f"{name} must be a finite number from 0{'' if high == math.inf else ' to 1'}, "
                                  f"got {v!r}")
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise EngineError(f"keep_tokens must be an integer >= 0, got {self.keep_tokens!r}")


def shuffle_caption(caption: str, keep: int, generator: torch.Generator) -> str:
    """Comma-separated tags: the first ``keep`` stay in place, the rest are shuffled."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=generator).tolist() if tail else []
    return ", ".join(head + [tail[i] for i in order])


# ---------------------------------------------------------------- latents with augmentation
@dataclass
class LatentItem:
    """The cached latent of one image: ``latent`` covers the bucket (equal to it unless random crop is on),
    ``flipped`` is the latent of the mirrored image (flip on), ``size`` the bucket in latent pixels (h, w)."""

    latent: torch.Tensor
    size: tuple
    flipped: torch.Tensor | None = None

    def view(self, flip: bool, u: float, v: float) -> torch.Tensor:
        """The (h, w) window at relative position (u, v) in [0, 1) of the (mirrored) cover latent."""
        lat = self.flipped if flip and self.flipped is not None else self.latent
        h, w = self.size
        top = int(u * (lat.shape[-2] - h + 1))
        left = int(v * (lat.shape[-1] - w + 1))
        return lat[..., top:top + h, left:left + w]


class DiffusionTask(torch.nn.Module):
    """``forward(batch)`` is the (weighted) diffusion loss of one micro-batch; ``batch(step, micro)`` draws it."""

    def __init__(self, unet: torch.nn.Module, te: torch.nn.Module, unet_fn, encode_fn, schedule: NoiseSchedule,
                 items: list[LatentItem], captions: list[str], sampler, options: DiffusionOptions, seed: int,
                 accum: int = 1, rank: int = 0, world: int = 1, train_te: bool = False):
        super().__init__()
        self.unet, self.te = unet, te
        self.unet_fn, self.encode_fn, self.schedule = unet_fn, encode_fn, schedule
        self.items, self.captions, self.sampler = items, captions, sampler
        self.opts, self.seed, self.accum, self.rank, self.world = options, seed, accum, rank, world
        self.train_te = train_te
        self._context_cache = {}

    # -- what step k trains on
    def batch(self, step: int, micro: int = 0) -> dict:
        """This process's micro-batch ``micro`` of step ``step``: latents, captions, noise and timesteps."""
        global_batch, _ = self.sampler.batch_at(step)
        n = len(global_batch)
        b = n // (self.accum * self.world)
        lo = (micro * self.world + self.rank) * b
        draws = self._draws(step, global_batch)
        sl = slice(lo, lo + b)
        x0 = torch.stack([self.items[i].view(f, u, v) for i, f, u, v in
                          zip(global_batch[sl], draws["flip"][sl], draws["crop_u"][sl], draws["crop_v"][sl])])
        captions = [self._caption(i, d, s) for i, d, s in
                    zip(global_batch[sl], draws["drop"][sl], draws["shuffle"][sl])]
        return {"x0": x0.float(), "captions": captions, "noise": draws["noise"][sl], "t": draws["t"][sl]}

    def _draws(self, step, global_batch):
        """All random numbers of the step, for the whole global batch, in a fixed order."""
        g = step_generator(self.seed, step)
        n = len(global_batch)
        first = self.items[global_batch[0]]
        shape = (n, first.latent.shape[0], *first.size)
        noise = torch.randn(shape, generator=g)
        t = torch.randint(0, self.schedule.num_timesteps, (n,), generator=g)
        offset = torch.randn(shape[:2], generator=g)
        if self.opts.noise_offset > 0:
            noise = noise + self.opts.noise_offset * offset[:, :, None, None]
        return {"noise": noise, "t": t,
                "drop": (torch.rand(n, generator=g) < self.opts.caption_dropout).tolist(),
                "flip": (torch.rand(n, generator=g) < 0.5).tolist() if self.opts.flip else [False] * n,
                "crop_u": torch.rand(n, generator=g).tolist() if self.opts.random_crop else [0.5] * n,
                "crop_v": torch.rand(n, generator=g).tolist() if self.opts.random_crop else [0.5] * n,
                "shuffle": torch.randint(0, 2 ** 62, (n,), generator=g).tolist()}

    def _caption(self, index, drop, shuffle_seed):
        caption = self.captions[index]
        if self.opts.shuffle_tags:
            caption = shuffle_caption(caption, self.opts.keep_tokens, torch.Generator().manual_seed(shuffle_seed))
        return "" if drop else caption

    # -- the loss
    def forward(self, batch: dict) -> torch.Tensor:
        device = self._device()
        x0, noise, t = batch["x0"].to(device), batch["noise"].to(device), batch["t"].to(device)
        return self.loss(x0, batch["captions"], noise, t, weighted=True)

    def loss(self, x0, captions, noise, t, weighted: bool = True) -> torch.Tensor:
        context = self._context(captions)
        x_t, target = self.schedule.noisy_and_target(x0, noise, t)
        pred = self.unet_fn(x_t, t, context)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        if weighted and self.opts.min_snr_gamma > 0:
            per_sample = per_sample * self.schedule.min_snr_weights(t, self.opts.min_snr_gamma).to(per_sample.device)
        return per_sample.mean()

    def _device(self):
        for p in self.unet.parameters():
            return p.device
        return torch.device("cpu")

    def _context(self, captions):
        """Text-encoder output; a frozen encoder encodes each caption once and keeps it (not with shuffled tags)."""
        if self.train_te or self.opts.shuffle_tags:
            return self.encode_fn(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._context_cache]
        if missing:
            with torch.no_grad():
                for c, z in zip(missing, self.encode_fn(missing)):
                    self._context_cache[c] = z
        return torch.stack([self._context_cache[c] for c in captions])


class ValidationSet:
    """Held-out latents with fixed noise and timesteps: ``__call__(task)`` is their mean unweighted loss.

    Each image is scored at ``per_image`` timesteps spread over the schedule, all drawn once from the seed, so
    the value moves only when the model does.
    """

    def __init__(self, items: list[LatentItem], captions: list[str], schedule: NoiseSchedule, seed: int,
                 per_image: int = 4, batch_size: int = 4):
        g = torch.Generator().manual_seed(seed + 99_991)
        self.cases = []
        for item, caption in zip(items, captions):
            x0 = item.view(False, 0.5, 0.5).float()
            edges = torch.linspace(0, schedule.num_timesteps, per_image + 1)
            for k in range(per_image):
                t = int(edges[k] + torch.rand((), generator=g) * (edges[k + 1] - edges[k]))
                t = min(t, schedule.num_timesteps - 1)
                self.cases.append((x0, caption, torch.randn(x0.shape, generator=g), t))
        self.batch_size = batch_size

    def __len__(self):
        return len(self.cases)

    def __call__(self, task: DiffusionTask) -> float:
        device = task._device()
        total, count = 0.0, 0
        by_shape = {}
        for case in self.cases:
            by_shape.setdefault(tuple(case[0].shape), []).append(case)
        for cases in by_shape.values():
            for i in range(0, len(cases), self.batch_size):
                chunk = cases[i:i + self.batch_size]
                x0 = torch.stack([c[0] for c in chunk]).to(device)
                noise = torch.stack([c[2] for c in chunk]).to(device)
                t = torch.tensor([c[3] for c in chunk], device=device)
                loss = task.loss(x0, [c[1] for c in chunk], noise, t, weighted=False)
                total += float(loss.detach()) * len(chunk)
                count += len(chunk)
        return total / count
