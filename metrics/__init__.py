"""Measure what the papers behind the pack measured: FID and KID (Inception features through torchmetrics /
torch-fidelity), α-FID of "Multistage guidance on the diffusion model inspired by human artists' creative
thinking" (eq. 6), CLIP score with the pack's open_clip loader, and the style classifier of "Text-Guided
Synthesis of Artistic Images with Retrieval-Augmented Diffusion Models" (a two-layer MLP on CLIP image
features). Pure: no ComfyUI import; the nodes in ``nodes/metrics.py`` and ``python -m metrics`` call it."""
