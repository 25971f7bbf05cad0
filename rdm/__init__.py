"""The retrieval-augmented diffusion model of "Text-Guided Synthesis of Artistic Images with Retrieval-Augmented
Diffusion Models" (Rombach, Blattmann, Ommer 2022; RDM): its checkpoint layout (``checkpoint``: key-layout
detection, EMA weights, the KL-f16 autoencoder's configuration) and its conditioning (``conditioning``: the
CLIP text embedding followed by the k retrieved CLIP image embeddings). Pure: no ComfyUI imports; the
ComfyUI objects are built by ``host.rdm``."""
