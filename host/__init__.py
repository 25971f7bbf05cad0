"""The one seam between the pack and ComfyUI: every ComfyUI import of the pack is in this package.

Nodes (``nodes/``) and the command-line tools that load models with ComfyUI (the trainer, the tiny-model
builder) call these functions; the cores (``samplers/ prompt_ext/ retrieval/ upscale/ training/ common/``)
never import ComfyUI and get what they need as plain values and small objects (a ``common.progress.Progress``,
a sigma list, a callable). ComfyUI is imported inside the functions, so the pack imports without it (the
static and unit tests) and inside it nothing is imported before ComfyUI has set itself up.

- ``host.locate``: find a ComfyUI checkout and its Python; make it importable from a command-line tool.
- ``host.folders``: the model folders (the pack's own registered, file lists and full paths).
- ``host.progress``: the progress protocol on ComfyUI's ProgressBar and interrupt; text shown on a node.
- ``host.sampling``: sampler and scheduler lists, sigma schedules, SAMPLER objects, guiders, conditioning.
- ``host.models``: devices and memory, safe file loading, checkpoints, LoRA, TAESD, CLIP vision outputs.
- ``host.rdm``: the retrieval-augmented diffusion model's model config, 16-channel latent format and KL-f16 VAE.
"""
