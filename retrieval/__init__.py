"""Style databases: embedder protocol, build/add/search/save/load (pure, no ComfyUI imports)."""
