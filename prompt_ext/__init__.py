"""Knowledge-grounded prompt extension (pure python/torch, no ComfyUI imports)."""
