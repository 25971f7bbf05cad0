"""Model files for the CLIP-guidance workflows and host tests (random weights, written where users put them):

- models/open_clip/atelier_cg_tiny.safetensors + its open_clip config (tests/fixtures/tiny_clip.py's tiny ViT);
- models/vae_approx/taesd_decoder.safetensors and taesd_encoder.safetensors (ComfyUI's TAESD classes), and a
  16-channel taesd3 pair (a decoder of the wrong latent format, for the bad-input test);
- models/atelier_style_db/atelier_cg_tiny_db (12 generated paintings embedded with the tiny CLIP);
- the SwinIR file clip_guided_swinir.json names (the upscale tests' tiny writer).

The TAESD files are written by ComfyUI's own Python so the layouts are ComfyUI's, not copies.
"""
import os
import pathlib
import subprocess
import textwrap

CLIP_FILE = "atelier_cg_tiny.safetensors"
DB_NAME = "atelier_cg_tiny_db"

_COMFY_WRITER = textwrap.dedent("""
    import sys, torch
    out_approx = sys.argv[1]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options; comfy.options.enable_args_parsing()
    from safetensors.torch import save_file
    from comfy.taesd.taesd import Decoder, Encoder

    def init(module):  # ComfyUI's layers skip weight init: give every tensor finite values
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim > 1:
                    torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
                    p.mul_(0.5)
                elif "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
        return module

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in init(Decoder(4)).state_dict().items()}, out_approx + "/taesd_decoder.safetensors")
    save_file({k: v.contiguous() for k, v in init(Encoder(4)).state_dict().items()}, out_approx + "/taesd_encoder.safetensors")
    # a 16-channel TAESD (SD3 layout): the wrong latent format for SD1.5, for the bad-input test
    save_file({k: v.contiguous() for k, v in init(Decoder(16)).state_dict().items()}, out_approx + "/taesd3_decoder.safetensors")
    save_file({k: v.contiguous() for k, v in init(Encoder(16)).state_dict().items()}, out_approx + "/taesd3_encoder.safetensors")
""")


def _write_comfy_models(server, models):
    approx = models / "vae_approx"
    approx.mkdir(parents=True, exist_ok=True)
    if (approx / "taesd_decoder.safetensors").exists():
        return
    env = dict(os.environ, PYTHONPATH=str(server.comfyui_path))
    proc = subprocess.run([str(server.python), "-c", _COMFY_WRITER, str(approx)],
                          cwd=server.comfyui_path, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("writing the random TAESD files failed:\n" + proc.stderr[-3000:])


def _write_swinir(models):
    from atelier.tests.fixtures.tiny_swinir import DEFAULT_FILE, write_tiny_swinir  # also used by prepare_upscale

    folder = models / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / DEFAULT_FILE).exists():
        write_tiny_swinir(folder / DEFAULT_FILE, scale=4)


def _write_clip_and_db(models):
    from atelier.retrieval.build import build_db
    from atelier.retrieval.embedder import OpenClipEmbedder
    from atelier.tests.fixtures.tiny_clip import TINY_NAME, make_tiny_open_clip, make_wikiart_folder

    clip_dir = models / "open_clip"
    weights = clip_dir / CLIP_FILE
    name, weights = make_tiny_open_clip(weights, config_dir=clip_dir)
    db = models / "atelier_style_db" / DB_NAME
    if not (db / "manifest.json").exists():
        images = models.parent / "cg_tiny_paintings"
        make_wikiart_folder(images, n=12)
        build_db(str(images), str(db), OpenClipEmbedder(name, str(weights), device="cpu"))
    return TINY_NAME


def prepare(server):
    models = pathlib.Path(server.base_dir) / "models"
    arch = _write_clip_and_db(models)
    _write_comfy_models(server, models)
    _write_swinir(models)
    small = {"cutn": 2, "cut_batches": 1}
    return {
        "clip_guided_swinir.json": {
            "14.weights": CLIP_FILE, "14.architecture": arch, "3.steps": 2, "11.tile_size": 32, "11.overlap": 16,
            **{f"3.{k}": v for k, v in small.items()},
        },
        "clip_guided_style.json": {
            "5.weights": CLIP_FILE, "5.architecture": arch, "6.db_name": f"{DB_NAME}/manifest.json",
            "12.steps": 2, "7.k": 4, **{f"9.{k}": v for k, v in small.items()},
        },
    }
