"""LoRA wrappers, injection by module-name patterns, and kohya key naming.

Kohya naming (``lora_unet_<path with _>``, ``lora_te_<path with _>`` with ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha``) is what ComfyUI's ``LoraLoader`` and every other UI map natively,
so the trainer writes exactly that and nothing else.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Iterable

import torch
from torch import nn

# Default targets, as kohya's "attention + feed-forward" LoRA: every Linear / 1x1 conv inside the UNet's
# transformer blocks, and the text encoder's attention and MLP projections (ComfyUI's LORA_CLIP_MAP).
UNET_ATTENTION_TARGETS = (
    r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    r"\.ff\.net\.(0\.proj|2)$",
    r"\.proj_(in|out)$",
)
UNET_ALL_TARGETS = (r".*",)
TEXT_ENCODER_TARGETS = (
    r"^text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    r"^text_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)$",
)


class LoRAModule(nn.Module):
    """``base(x) + multiplier * alpha/rank * up(down(x))``; ``up`` starts at zero so the wrap is the identity."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.lora_down = down
        self.lora_up = up
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.multiplier = 1.0
        with torch.no_grad():  # drawn on the CPU from ``generator`` so a seed gives the same factors anywhere
            w = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            self.lora_down.weight.copy_(w)
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        delta = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (delta * (self.scale * self.multiplier)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The weight difference this LoRA adds, shaped like ``base.weight`` (what ComfyUI computes too)."""
        up = self.lora_up.weight.flatten(1).float()
        down = self.lora_down.weight.flatten(1).float()
        return (up @ down).reshape(self.base.weight.shape) * self.scale * self.multiplier


def wrap_module(module: nn.Module, rank: int, alpha: float, dtype=torch.float32,
                generator: torch.Generator | None = None) -> LoRAModule | None:
    """Wrap a Linear or a (groups=1) Conv2d; None for anything else. ``generator`` draws the down factor."""
    device = module.weight.device
    if isinstance(module, nn.Linear):
        down = nn.Linear(module.in_features, rank, bias=False, device=device, dtype=dtype)
        up = nn.Linear(rank, module.out_features, bias=False, device=device, dtype=dtype)
    elif isinstance(module, nn.Conv2d) and module.groups == 1:
        # kohya "C3Lier": down carries the kernel, up is 1x1; ComfyUI multiplies them back into a conv weight
        down = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding,
                         module.dilation, bias=False, device=device, dtype=dtype)
        up = nn.Conv2d(rank, module.out_channels, 1, bias=False, device=device, dtype=dtype)
    else:
        return None
    return LoRAModule(module, down, up, rank, alpha, generator)


def module_generator(seed: int, path: str) -> torch.Generator:
    """The generator of one LoRA module's initial factors: a function of the seed and the module's path only,
    so the same seed gives the same initialisation whatever else the process drew before."""
    digest = hashlib.sha256(f"{seed}|{path}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2 ** 63))


def inject_lora(root: nn.Module, patterns: Iterable[str], rank: int, alpha: float,
                dtype=torch.float32, include_conv3x3: bool = True, seed: int = 0,
                prefix: str = "") -> dict[str, LoRAModule]:
    """Replace every Linear/Conv2d under ``root`` whose dotted path matches a pattern; returns path → wrapper.

    Base weights are frozen here; only the LoRA factors train. Their initial values come from
    :func:`module_generator` (``seed``, ``prefix`` + path): seeded, and independent of the global RNG.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    regexes = [re.compile(p) for p in patterns]
    targets = []
    existing = [n + "." for n, m in root.named_modules() if isinstance(m, LoRAModule)]
    for name, mod in root.named_modules():
        if isinstance(mod, LoRAModule) or any(name.startswith(e) for e in existing):
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or name == "":
            continue
        if isinstance(mod, nn.Conv2d) and not include_conv3x3 and mod.kernel_size != (1, 1):
            continue
        if any(r.search(name) for r in regexes):
            targets.append(name)
    wrapped = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        base = parent._modules[child]
        lora = wrap_module(base, rank, alpha, dtype, module_generator(seed, f"{prefix}{name}"))
        if lora is None:
            continue
        base.requires_grad_(False)
        parent._modules[child] = lora
        wrapped[name] = lora
    if not wrapped:
        raise ValueError(f"no Linear/Conv2d module matched the LoRA target patterns {list(patterns)}")
    return wrapped


def remove_lora(root: nn.Module, merge: bool) -> int:
    """Put the base modules back (optionally merging the LoRA into their weights). Returns how many."""
    count = 0
    for name, mod in list(root.named_modules()):
        if isinstance(mod, LoRAModule):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            if merge:
                with torch.no_grad():
                    w = mod.base.weight
                    w.copy_((w.float() + mod.delta_weight().to(w.device)).to(w.dtype))
            parent._modules[child] = mod.base
            count += 1
    return count


def kohya_key(prefix: str, path: str) -> str:
    """``lora_unet`` + ``input_blocks.1.1.proj_in`` → ``lora_unet_input_blocks_1_1_proj_in``."""
    return f"{prefix}_{path.replace('.', '_')}"


def lora_state_dict(groups: dict[str, dict[str, LoRAModule]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Kohya tensors for ``{prefix: {path: module}}``."""
    out = {}
    for prefix, modules in groups.items():
        for path, mod in modules.items():
            key = kohya_key(prefix, path)
            out[f"{key}.lora_down.weight"] = mod.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = mod.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(mod.alpha, dtype=dtype)
    return out


def load_lora_state_dict(groups: dict[str, dict[str, LoRAModule]], sd: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`lora_state_dict`; refuses missing or extra keys (a LoRA for another model)."""
    expected = set()
    for prefix, modules in groups.items():
        for path, mod in modules.items():
            key = kohya_key(prefix, path)
            expected.update({f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"})
            with torch.no_grad():
                for part in ("lora_down", "lora_up"):
                    t = sd.get(f"{key}.{part}.weight")
                    if t is None:
                        raise KeyError(f"LoRA file lacks {key}.{part}.weight")
                    w = getattr(mod, part).weight
                    if t.shape != w.shape:
                        raise ValueError(f"{key}.{part}.weight has shape {tuple(t.shape)}, model needs "
                                         f"{tuple(w.shape)} (different rank or base model?)")
                    w.copy_(t.to(w.dtype))
            if f"{key}.alpha" in sd:
                mod.alpha = float(sd[f"{key}.alpha"])
    extra = sorted(set(sd) - expected)
    if extra:
        raise KeyError(f"{len(extra)} LoRA keys match no module here, e.g. {extra[:3]}")
