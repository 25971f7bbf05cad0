"""Style databases for retrieval-augmented generation (the retrieval of "Text-Guided Synthesis of Artistic Images
with Retrieval-Augmented Diffusion Models", RDM): the open_clip embedder, building / resuming / adding / merging
(``build``), the format and its search (``db``), the nodes' work (``library``, ``query``, ``present``) and the
command line (``cli``). Pure: no ComfyUI imports."""
