"""What several areas of the pack share: the progress protocol, atomic files and hashes, model-folder names,
and the names in art datasets (WikiArt, ArtBench). Pure: no ComfyUI import."""
