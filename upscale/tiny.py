"""Tiny random SwinIR models for tests, benchmarks and host runs (no download; a few hundred KB).

Built from spandrel's own SwinIR class, so ``spandrel.ModelLoader`` detects it exactly like a released
file. Default random init makes attention nearly uniform and the influence of a tile edge dies within
~12 px; ``gain`` sharpens the linear layers and the relative position bias so it reaches ~26 px (the
analytic bound for this config is 34, see ``upscale.tiled.receptive_radius``).
"""
from __future__ import annotations

import torch

DEFAULT_FILE = "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth"


def tiny_swinir_state_dict(scale=2, gain=16.0, seed=0, window=8, upsampler="pixelshuffle", in_chans=3):
    from spandrel.architectures.SwinIR import SwinIR

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = SwinIR(img_size=32, in_chans=in_chans, embed_dim=12, depths=[2, 2], num_heads=[2, 2],
                     window_size=window, mlp_ratio=2.0, upscale=scale, img_range=1.0, upsampler=upsampler,
                     resi_connection="1conv")
        sd = net.state_dict()
        for key, value in sd.items():
            if key.endswith("weight") and value.ndim == 2:
                sd[key] = value * gain
            elif "relative_position_bias_table" in key:
                sd[key] = torch.randn_like(value)
    finally:
        torch.random.set_rng_state(gen_state)
    return sd


def tiny_swinir(**kwargs):
    """A real spandrel ``ImageModelDescriptor`` (eval mode) around a tiny random SwinIR."""
    from spandrel import ModelLoader

    return ModelLoader().load_from_state_dict(tiny_swinir_state_dict(**kwargs)).eval()


def write_tiny_swinir(path, scale=4, gain=1.0, seed=0):
    """Write a x4 real-SR-style tiny SwinIR as the official releases are laid out: {"params_ema": sd}."""
    sd = tiny_swinir_state_dict(scale=scale, gain=gain, seed=seed, upsampler="nearest+conv")
    torch.save({"params_ema": sd}, str(path))
    return path
