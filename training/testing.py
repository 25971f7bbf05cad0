"""Toy stand-ins for tests and the CPU benchmark: a small UNet-like denoiser, a text encoder laid out like
CLIP's (``text_model.encoder.layers.N.self_attn.q_proj``...), and a backend with SD1Backend's interface.

They exist so the training core is exercised without ComfyUI or downloaded weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from torch import nn

from .lora import TEXT_ENCODER_TARGETS, inject_lora
from .loop import NoiseSchedule, scaled_linear_alphas_cumprod


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` torch threads: toy models are tiny, extra threads only fight other processes."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), -1)
        return self.out_proj(a @ v)


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(d), _Attn(d)
        self.layer_norm2, self.mlp = nn.LayerNorm(d), _MLP(d)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ToyTextEncoder(nn.Module):
    """Bytes → embeddings → N pre-norm transformer layers; module names as in CLIP's text model."""

    def __init__(self, dim=16, layers=1, length=12):
        super().__init__()
        self.length = length
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Embedding(256, dim)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(_Layer(dim) for _ in range(layers))

    def forward(self, captions: list[str]):
        ids = torch.tensor([[b for b in c.encode()[:self.length].ljust(self.length, b" ")] for c in captions])
        x = self.text_model.embeddings(ids.to(self.text_model.embeddings.weight.device))
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return x


class ToyUNet(nn.Module):
    """Conv in → + time and text features → conv block → conv out; predicts ε for latents [B,4,H,W]."""

    def __init__(self, ch=16, ctx_dim=16):
        super().__init__()
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.time = nn.Linear(8, ch)
        self.ctx = nn.Linear(ctx_dim, ch)
        self.block = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU())
        self.proj_out = nn.Conv2d(ch, 4, 1)

    def forward(self, x, t, context):
        freqs = torch.exp(torch.arange(4, device=x.device) * -math.log(1000.0) / 4)
        ang = t.float()[:, None] * freqs[None]
        temb = self.time(torch.cat([ang.sin(), ang.cos()], -1))
        h = self.conv_in(x) + temb[:, :, None, None] + self.ctx(context.mean(1))[:, :, None, None]
        return self.proj_out(self.block(h))


class ToyBackend:
    """SD1Backend's interface over the toys (used by CLI tests; no ComfyUI)."""

    def __init__(self, seed=0, prediction="epsilon"):
        torch.manual_seed(seed)
        self.unet = ToyUNet()
        self.te = ToyTextEncoder()
        self.te_root = self.te
        self.unet.requires_grad_(False)
        self.te.requires_grad_(False)
        self.vae = nn.Conv2d(3, 4, 8, stride=8)  # "VAE": 8× downsampling like SD's
        self.schedule = NoiseSchedule(scaled_linear_alphas_cumprod(), prediction)
        # like ComfyUI's key maps: every layer's kohya name, taken before any LoRA wraps a layer
        self._key_map = {f"lora_unet_{n.replace('.', '_')}" for n, _ in self.unet.named_modules() if n}
        self._key_map |= {f"lora_te_{n.replace('.', '_')}" for n, _ in self.te.named_modules() if n}

    def unet_fn(self, x_t, t, context):
        return self.unet(x_t, t, context)

    def encode_fn(self, captions):
        return self.te(captions)

    @torch.no_grad()
    def vae_encode(self, images):
        return self.vae(images * 2 - 1)

    def vae_hash(self):
        h = hashlib.sha256()
        for k, v in sorted(self.vae.state_dict().items()):
            h.update(k.encode() + v.numpy().tobytes())
        return h.hexdigest()

    def inject(self, rank, alpha, unet_targets="attention", train_text_encoder=False):
        patterns = (r".*",) if unet_targets == "all" else (r"^(time|ctx|proj_out)$",)
        groups = {"lora_unet": inject_lora(self.unet, patterns, rank, alpha)}
        if train_text_encoder:
            groups["lora_te"] = inject_lora(self.te_root, TEXT_ENCODER_TARGETS, rank, alpha)
        return groups

    def checkpoint_modules(self):
        return [self.unet.block] + list(self.te.text_model.encoder.layers)

    def lora_key_map(self):
        return self._key_map

    def save_full_checkpoint(self, path, metadata):
        from safetensors.torch import save_file
        from .data import atomic_write

        sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in self.unet.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


CAPTIONS = ["a painting by claude monet", "water lilies", "haystacks at dusk", "a cathedral in fog"]


def make_toy_trainer(out_dir, steps=6, te_steps=0, lora=True, ema=0.0, mp="no", batch=1, rank=0, world=1,
                 seed=0, every=0, on_step=None, prediction="epsilon"):
    """A Trainer over the toy UNet and text encoder with 4 fixed latents; same weights on every call."""
    from .data import BucketBatchSampler
    from .loop import TrainConfig, Trainer

    torch.manual_seed(123)
    unet, te = ToyUNet(), ToyTextEncoder()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    if lora:
        u = inject_lora(unet, (r"^(ctx|time|proj_out|conv_in)$",), 4, 4.0)
        t = inject_lora(te, TEXT_ENCODER_TARGETS, 4, 4.0)
        params = {"unet": {f"{k}.{n}": getattr(m, n).weight for k, m in u.items() for n in ("lora_down", "lora_up")},
                  "te": {f"{k}.{n}": getattr(m, n).weight for k, m in t.items() for n in ("lora_down", "lora_up")}}
    else:
        params = {"unet": dict(unet.named_parameters()), "te": dict(te.named_parameters())}
    for g in params.values():
        for p in g.values():
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(7)
    latents = [torch.randn(4, 8, 8, generator=g) for _ in CAPTIONS]
    cfg = TrainConfig(steps=steps, batch_size=batch, lr_unet=1e-2, lr_text_encoder=5e-3, text_encoder_only_steps=te_steps,
                      mixed_precision=mp, ema_decay=ema, seed=seed, checkpoint_every=every)
    sampler = BucketBatchSampler([(64, 64)] * len(CAPTIONS), batch, seed, rank, world)
    sched = NoiseSchedule(scaled_linear_alphas_cumprod(), prediction)
    tr = Trainer(cfg, lambda x, t, c: unet(x, t, c), lambda caps: te(caps), sched, params, latents, CAPTIONS,
                 sampler, str(out_dir), on_step=on_step)
    tr.toys = (unet, te)
    return tr


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, result: str, steps: int, batch: int):
    """One torch.distributed (gloo) process training the toy; rank 0 writes the final weights to ``result``."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = make_toy_trainer(out_dir, steps=steps, batch=batch, rank=rank, world=world)
        tr.train(progress=False)
        if rank == 0:
            save_file({k: p.detach().contiguous() for k, p in tr.flat_params().items()}, result)
    finally:
        dist.destroy_process_group()
