"""Host preparer: a tiny random SwinIR where the example workflow's loader looks for the real one."""
from atelier.tests.fixtures.tiny_swinir import DEFAULT_FILE, write_tiny_swinir


def prepare(server):
    folder = server.base_dir / "models" / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / DEFAULT_FILE).exists():
        write_tiny_swinir(folder / DEFAULT_FILE, scale=4)
    # small tiles so the workflow run also exercises tiling at the host test's 64x64
    return {"swinir_upscale.json": {"11.tile_size": 32, "11.overlap": 16}}
