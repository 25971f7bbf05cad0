"""Tiled inference for single-image super-resolution models (pure torch, no ComfyUI).

Why not ``comfy.utils.tiled_scale``: the core must not import ComfyUI, and the stock helper places tiles
at arbitrary offsets (so SwinIR's attention windows in a tile do not line up with the windows of an untiled
run), ramps its feather from the very tile edge (the least trustworthy pixels get weight), runs one tile per
call, and leaves OOM handling to every caller. Here tiles start on multiples of the model's window size,
overlaps are cross-faded in a band centred in the overlap (the outer margin of every tile is dropped),
tiles of equal shape run as batches, and an out-of-memory error halves the batch and then the tile down to
a floor before a clear error. Away from tile borders (further than the receptive field, see
``receptive_radius``) the output equals an untiled run to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..common.progress import NO_PROGRESS, Progress

# SwinIR's activations overflow fp16 (SwinIR#180, A1111 #14524, chaiNNer #878). spandrel
# allows bf16, but bf16 output differs from fp32 (tests/unit/test_upscale_tiled.py), so fp32 only. Other
# architectures follow their descriptor's supports_half / supports_bfloat16.
FP32_ONLY_ARCHES = {"SwinIR"}


# torch.OutOfMemoryError appeared in torch 2.5; older builds only have the CUDA one
TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class TileOOMError(RuntimeError):
    """Out of memory even at the smallest tile allowed."""


@dataclass(frozen=True)
class TileRequirements:
    """What a tile must satisfy: spandrel's size requirements plus window alignment."""

    minimum: int = 1
    multiple_of: int = 1
    square: bool = False
    window: int = 1

    @property
    def align(self) -> int:
        """Tiles start on, and are sized in, multiples of this so windows coincide with an untiled run."""
        return math.lcm(max(1, self.multiple_of), max(1, self.window))

    @property
    def smallest_tile(self) -> int:
        """The smallest legal tile edge."""
        return max(self.align, _ceil_to(max(1, self.minimum), self.align))


@dataclass
class TileReport:
    """What a tiled run did (for the node's UI text and for benchmarks)."""

    tile: int
    overlap: int
    tile_batch: int
    grid: tuple[int, int]
    tiles: int
    model_calls: int
    oom_retries: int = 0
    notes: list[str] = field(default_factory=list)


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _arch_id(model) -> str | None:
    arch = getattr(model, "architecture", None)
    return getattr(arch, "id", None) if arch is not None else None


def _is_masked_descriptor(model) -> bool:
    try:
        from spandrel import MaskedImageModelDescriptor
    except ImportError:  # spandrel is optional for plain callables
        return False
    return isinstance(model, MaskedImageModelDescriptor)


def _module_of(model):
    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else None


def requirements_of(model, window: int | None = None) -> TileRequirements:
    """Tile requirements of a spandrel descriptor (``size_requirements`` + the net's ``window_size``).

    Spandrel's SwinIR requirements say ``multiple_of=1`` because the network pads itself to its window, but
    a tile that does not start on a window boundary gets different attention windows than the whole image
    would: so the window size is read from the module as well.
    """
    req = getattr(model, "size_requirements", None)
    if window is None:
        module = _module_of(model)
        window = getattr(module, "window_size", None) if module is not None else None
        if isinstance(window, (tuple, list)):
            window = max(window)
        window = int(window) if isinstance(window, int) and window > 0 else 1
    if req is None:
        return TileRequirements(window=window)
    return TileRequirements(
        minimum=int(getattr(req, "minimum", 0) or 1),
        multiple_of=int(getattr(req, "multiple_of", 1) or 1),
        square=bool(getattr(req, "square", False)),
        window=window,
    )


def receptive_radius(model) -> int | None:
    """Upper bound (input pixels) on how far a SwinIR output pixel sees; None when unknown.

    Each Swin block mixes tokens only inside one (shifted) window, so information moves at most
    ``window - 1`` pixels per block; every residual group ends in a 3x3 conv (two for "3conv"), plus
    ``conv_first``, ``conv_after_body`` and the reconstruction convs. Output pixels further than this from
    every internal tile edge are identical to an untiled run. For SwinIR-L (9 groups x 6 blocks, window 8)
    the bound is ~390 px: exact tiling is impractical there and the blend band is what hides seams.
    """
    module = _module_of(model)
    layers = getattr(module, "layers", None)
    window = getattr(module, "window_size", None)
    if layers is None or not isinstance(window, int):
        return None
    radius = 0
    for layer in layers:
        blocks = getattr(getattr(layer, "residual_group", None), "blocks", None)
        if blocks is None:
            return None
        radius += len(blocks) * (window - 1)
        conv = getattr(layer, "conv", None)
        radius += 2 if isinstance(conv, torch.nn.Sequential) else 1
    # conv_first, conv_after_body, conv_before_upsample and the high-res convs (< 1 input pixel each)
    return radius + 4


def check_precision(model, dtype: torch.dtype) -> None:
    """Refuse reduced precision where it is unsafe: always for SwinIR-like nets, else per descriptor flags."""
    if dtype == torch.float32:
        return
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"Unsupported dtype {dtype}: use torch.float32 (or float16/bfloat16 where allowed).")
    arch = _arch_id(model)
    if arch in FP32_ONLY_ARCHES:
        raise ValueError(
            f"{arch} must run in float32: its activations grow through the transformer stack and overflow "
            f"float16 (black/NaN images), and bfloat16 does not match the float32 output. Use dtype=float32."
        )
    if dtype == torch.float16 and getattr(model, "supports_half", True) is False:
        raise ValueError(f"{arch or 'This model'} does not support float16; use float32.")
    if dtype == torch.bfloat16 and getattr(model, "supports_bfloat16", True) is False:
        raise ValueError(f"{arch or 'This model'} does not support bfloat16; use float32.")


def plan_axis(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """Tile intervals [start, end) along one axis.

    Starts are multiples of ``align``; every tile is ``tile`` long except the last, which is placed on the
    first aligned start that reaches the end (so its length is in (tile - align, tile]). Neighbours overlap
    by at least ``overlap``.
    """
    if length <= tile:
        return [(0, length)]
    stride = max(align, (tile - overlap) // align * align)
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + stride)
    starts[-1] = min(starts[-1], _ceil_to(length - tile, align))
    return [(s, min(s + tile, length)) for s in starts]


def blend_weights(intervals: Sequence[tuple[int, int]], scale: int, feather: float) -> list[torch.Tensor]:
    """Per-tile 1-D weights (output pixels), normalised to sum to one at every output pixel.

    Between two neighbours the cross-fade is a linear ramp ``feather * overlap`` wide centred in the
    overlap; outside it one tile has weight exactly 1, so those pixels are that tile's output unchanged.
    """
    n = len(intervals)
    if n == 1:
        s, e = intervals[0]
        return [torch.ones((e - s) * scale)]
    seams = []  # (centre, width) in output pixels between tile i and i+1
    for (s0, e0), (s1, e1) in zip(intervals[:-1], intervals[1:]):
        ov = (e0 - s1) * scale
        seams.append(((s1 + e0) * scale / 2.0, max(0.0, feather * ov)))
    weights = []
    for i, (s, e) in enumerate(intervals):
        x = torch.arange(s * scale, e * scale, dtype=torch.float64) + 0.5
        w = torch.ones_like(x)
        if i > 0:
            c, f = seams[i - 1]
            w = w * (_ramp(x, c, f))
        if i < n - 1:
            c, f = seams[i]
            w = w * (1.0 - _ramp(x, c, f))
        weights.append(w)
    # normalise: where ramps of distant seams meet (tiny last tile) the raw weights need not sum to one
    total = torch.zeros(intervals[-1][1] * scale, dtype=torch.float64)
    for (s, e), w in zip(intervals, weights):
        total[s * scale:e * scale] += w
    if not bool((total > 0).all()):
        raise AssertionError("tile plan leaves output pixels uncovered")  # a bug, not user input
    return [(w / total[s * scale:e * scale]).float() for (s, e), w in zip(intervals, weights)]


def _ramp(x: torch.Tensor, centre: float, width: float) -> torch.Tensor:
    if width <= 0:
        return (x >= centre).to(x.dtype)
    return ((x - (centre - width / 2.0)) / width).clamp(0.0, 1.0)


def pad_border(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right: reflect as far as the image allows, replicate beyond (as spandrel does)."""
    if pad_h <= 0 and pad_w <= 0:
        return x
    h, w = x.shape[-2:]
    rh, rw = min(pad_h, h - 1), min(pad_w, w - 1)
    if rh > 0 or rw > 0:
        x = F.pad(x, (0, rw, 0, rh), mode="reflect")
    if pad_h - rh > 0 or pad_w - rw > 0:
        x = F.pad(x, (0, pad_w - rw, 0, pad_h - rh), mode="replicate")
    return x


def _padded_size(h: int, w: int, req: TileRequirements) -> tuple[int, int]:
    ph = _ceil_to(max(h, req.minimum), req.align)
    pw = _ceil_to(max(w, req.minimum), req.align)
    if req.square:
        ph = pw = max(ph, pw)
    return ph, pw


def _checked_scale(model, image, dtype, scale):
    """Refuse what cannot run (shape, model kind, precision, channels); the model's scale as an int."""
    if image.ndim != 4:
        raise ValueError(f"Expected an image batch [B, C, H, W], got shape {tuple(image.shape)}.")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"Empty image batch {tuple(image.shape)}.")
    if not callable(model):
        raise TypeError(f"model must be a spandrel ImageModelDescriptor or a callable, got {type(model).__name__}.")
    if _is_masked_descriptor(model):
        raise TypeError(
            f"{type(model).__name__} ({_arch_id(model)}) is not a single-image model (e.g. an inpainting model "
            f"that needs a mask); load an upscaling/restoration model instead."
        )
    check_precision(model, dtype)
    if scale is None:
        scale = getattr(model, "scale", None)
        if scale is None:
            raise ValueError("scale is required when model is a plain callable.")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}.")
    in_ch = getattr(model, "input_channels", None)
    if in_ch is not None and image.shape[1] != in_ch:
        raise ValueError(f"The model expects {in_ch} input channels, the image has {image.shape[1]}.")
    return scale


def _checked_tile(req, tile, overlap, feather):
    """The tile rounded down to the alignment, after checking tile, overlap and feather."""
    if tile < req.smallest_tile:
        raise ValueError(
            f"tile={tile} is smaller than the model allows ({req.smallest_tile} px: window {req.window}, "
            f"multiple of {req.multiple_of}, minimum {req.minimum}). Use tile >= {req.smallest_tile}."
        )
    tile = tile // req.align * req.align
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap} must be >= 0 and smaller than the tile ({tile}).")
    if not 0.0 <= feather <= 1.0:
        raise ValueError(f"feather={feather} must be in [0, 1].")
    return tile


def _default_device(model, image):
    module = _module_of(model)
    params = next(module.parameters(), None) if module is not None else None
    return params.device if params is not None else image.device


def upscale_tiled(
    model,
    image: torch.Tensor,
    *,
    tile: int = 512,
    overlap: int = 32,
    scale: int | None = None,
    tile_batch: int = 1,
    min_tile: int = 64,
    feather: float = 0.5,
    requirements: TileRequirements | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    output_device: torch.device | str = "cpu",
    oom_exceptions: Iterable[type[BaseException]] = (TORCH_OOM,),
    on_oom: Callable[[], None] | None = None,
    progress: Progress = NO_PROGRESS,
    report: TileReport | None = None,
) -> torch.Tensor:
    """Run ``model`` over ``image`` ([B, C, H, W], 0..1) tile by tile; returns [B, C_out, H*s, W*s] float32.

    ``model`` is a spandrel ``ImageModelDescriptor`` (scale, size requirements and window read from it) or
    any callable [N, C, h, w] -> [N, C_out, h*s, w*s] with ``scale`` (and ``requirements``) given.
    ``tile``/``overlap`` are input pixels; ``tile`` is rounded down to the alignment. On an exception in
    ``oom_exceptions`` the tile batch is halved, then the tile, down to ``min_tile``; below that
    ``TileOOMError``. ``progress.update(done, total)`` runs after each model call (tiles done of all tiles),
    ``progress.check_interrupt()`` before it.
    """
    scale = _checked_scale(model, image, dtype, scale)
    req = requirements or requirements_of(model)
    tile = _checked_tile(req, tile, overlap, feather)
    floor = max(req.smallest_tile, min_tile // req.align * req.align)
    tile_batch = max(1, int(tile_batch))
    oom_types = tuple(oom_exceptions)
    device = _default_device(model, image) if device is None else device

    retries = 0
    while True:
        try:
            out, rep = _run(model, image, tile, overlap, scale, tile_batch, feather, req, dtype, device,
                            output_device, progress)
            break
        except BaseException as exc:  # noqa: BLE001 - filtered to the caller's OOM types just below
            if not oom_types or not isinstance(exc, oom_types):
                raise
            retries += 1
            if on_oom is not None:
                on_oom()
            tile, overlap, tile_batch = _smaller(tile, overlap, tile_batch, req.align, floor, image, exc)
    rep.oom_retries = retries
    if report is not None:
        report.__dict__.update(rep.__dict__)
    return out


def _smaller(tile, overlap, tile_batch, align, floor, image, exc):
    """The next try after an out-of-memory error: half the batch, else half the tile; TileOOMError at the floor."""
    if tile_batch > 1:
        return tile, overlap, tile_batch // 2
    smaller = (tile // 2) // align * align
    if smaller < floor:
        raise TileOOMError(
            f"Out of memory even with {tile}x{tile} tiles (floor {floor}) on a "
            f"{image.shape[-1]}x{image.shape[-2]} image: free memory (close other models), use a "
            f"smaller model, or run on the CPU."
        ) from exc
    return smaller, min(overlap, smaller // 2), tile_batch


def _run(model, image, tile, overlap, scale, tile_batch, feather, req, dtype, device, output_device, progress):
    b, _, h, w = image.shape
    rows = plan_axis(h, tile, overlap, req.align)
    cols = plan_axis(w, tile, overlap, req.align)
    wy = blend_weights(rows, scale, feather)
    wx = blend_weights(cols, scale, feather)
    jobs = [(n, i, j) for n in range(b) for i in range(len(rows)) for j in range(len(cols))]
    groups: dict[tuple[int, int], list] = {}
    for job in jobs:
        _, i, j = job
        key = (rows[i][1] - rows[i][0], cols[j][1] - cols[j][0])
        groups.setdefault(key, []).append(job)
    batches = [(key, g[k:k + tile_batch]) for key, g in groups.items() for k in range(0, len(g), tile_batch)]

    out = None
    done = 0
    calls = 0
    for (th, tw), batch in batches:
        progress.check_interrupt()
        ph, pw = _padded_size(th, tw, req)
        crops = [image[n:n + 1, :, rows[i][0]:rows[i][1], cols[j][0]:cols[j][1]] for n, i, j in batch]
        x = pad_border(torch.cat(crops, 0).to(device=device, dtype=dtype), ph - th, pw - tw)
        with torch.inference_mode():
            y = model(x)
        calls += 1
        if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[-2:] != (ph * scale, pw * scale):
            raise ValueError(
                f"The model returned shape {tuple(y.shape)} for input {tuple(x.shape)}; expected scale x{scale}."
            )
        y = y[:, :, :th * scale, :tw * scale].to(device=output_device, dtype=torch.float32)
        if out is None:
            out = torch.zeros(b, y.shape[1], h * scale, w * scale, dtype=torch.float32, device=output_device)
        for k, (n, i, j) in enumerate(batch):
            (r0, r1), (c0, c1) = rows[i], cols[j]
            wgt = wy[i].to(output_device)[:, None] * wx[j].to(output_device)[None, :]
            out[n, :, r0 * scale:r1 * scale, c0 * scale:c1 * scale] += y[k] * wgt
        done += len(batch)
        progress.update(done, len(jobs))
    rep = TileReport(tile=tile, overlap=overlap, tile_batch=tile_batch, grid=(len(rows), len(cols)),
                     tiles=len(jobs), model_calls=calls)
    return out, rep

