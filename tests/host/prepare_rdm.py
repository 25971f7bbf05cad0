"""Model files for the RDM workflows in the host session (see tests/host/conftest.py).

A tiny random RDM in the exact CompVis layout (tests/fixtures/tiny_rdm.py, built once with ComfyUI's Python and
cached) as ``models/rdm/model.ckpt`` (the name the workflows use) and its conversions; a tiny 768-d open_clip
model; two CompVis retrieval databases (generated ``*.npz`` parts) imported as ``artbench_surrealism`` and
``artbench_ukiyo_e``.
"""
import hashlib
import os
import pathlib
import subprocess

CLIP768 = "Atelier-Tiny-ViT-L"
DATABASES = {"artbench_surrealism": 0, "artbench_ukiyo_e": 7}
FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tiny_rdm.py"


def ensure_tiny_rdm(server):
    """Folder of the cached tiny RDM files (tiny_rdm.ckpt, .safetensors, _noema.safetensors)."""
    from atelier.common.files import cache_dir, locked
    from atelier.runner.tiny import builder_env

    key = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()[:12]
    target = pathlib.Path(cache_dir()) / f"tiny_rdm_{key}"
    if (target / "tiny_rdm_noema.safetensors").is_file():
        return target
    with locked(str(target) + ".lock"):
        if (target / "tiny_rdm_noema.safetensors").is_file():
            return target
        partial = target.with_name(target.name + f".{os.getpid()}.part")
        proc = subprocess.run([str(server.python), "-m", "atelier.tests.fixtures.tiny_rdm", str(partial)],
                              cwd=server.comfyui_path, env=builder_env(server.comfyui_path), capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError("building the tiny RDM failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
        os.replace(partial, target)
    return target


def prepare(server):
    from atelier.retrieval.importers.formats import import_source
    from atelier.runner.tiny import place_checkpoint
    from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip
    from atelier.tests.fixtures.tiny_rdm import make_compvis_npz

    models = pathlib.Path(server.base_dir) / "models"
    tiny = ensure_tiny_rdm(server)
    for name, link in (("tiny_rdm.ckpt", "model.ckpt"), ("tiny_rdm.ckpt", "tiny_rdm.ckpt"),
                       ("tiny_rdm.safetensors", "tiny_rdm.safetensors"),
                       ("tiny_rdm_noema.safetensors", "tiny_rdm_noema.safetensors")):
        place_checkpoint(tiny / name, models / "rdm", [link])
    place_checkpoint(server.tiny_checkpoint, models / "rdm", ["sd15_in_the_wrong_folder.safetensors"])
    clip_dir = models / "open_clip"
    make_tiny_open_clip(clip_dir / f"{CLIP768}.safetensors", name=CLIP768, config_dir=clip_dir, embed_dim=768)
    for db, seed in DATABASES.items():
        src = pathlib.Path(server.base_dir) / "compvis" / db.replace("_", "-", 1)
        make_compvis_npz(src / "768-part_1.npz", n=30, seed=seed)
        make_compvis_npz(src / "768-part_2.npz", n=20, seed=seed + 1)
        import_source(src, models / "atelier_style_db" / db, arch=CLIP768, log=lambda m: None)
    server.rdm_files = tiny
    loader = {"AtelierOpenCLIPLoader.weights": f"{CLIP768}.safetensors",
              "AtelierOpenCLIPLoader.architecture": "auto from file name"}
    return {name: dict(loader) for name in ("rdm_artbench.json", "rdm_database_swap.json", "rdm_text_only.json")}
