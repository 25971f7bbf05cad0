"""Model files for the metric workflows in the host session (see tests/host/conftest.py).

Writes random FID-Inception weights under the real file name into ``models/atelier_fid`` with generated
reference folders (``dragons/``, ``fish/``, ``claude_monet_paintings/``) and a statistics file, a tiny random
open_clip model of its own, a style database and a style classifier trained on it. The overrides give every
latent batch 2 images (FID needs two) and use the Inception's 64-d layer (only its first layers run: CPU time).
"""
import pathlib

CLIP_FILE = "Atelier-Tiny-ViT-metrics.safetensors"
DB = "tiny_metrics_db"
CLASSIFIER = "tiny_styles.safetensors"
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


def prepare(server):
    from atelier.metrics.style import labelled_features, train_classifier
    from atelier.retrieval.build import build_db
    from atelier.retrieval.db import load_db
    from atelier.retrieval.embedder import OpenClipEmbedder
    from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder
    from atelier.tests.fixtures.tiny_inception import write_random_inception

    models = pathlib.Path(server.base_dir) / "models"
    fid_dir = models / "atelier_fid"
    write_random_inception(fid_dir / INCEPTION)
    for name, n, size in (("dragons", 5, 48), ("fish", 4, 40), ("claude_monet_paintings", 6, 56)):
        make_wikiart_folder(fid_dir / name, n=n, size=size, with_csv=False)
    clip_dir = models / "open_clip"
    name, weights = make_tiny_open_clip(clip_dir / CLIP_FILE, config_dir=clip_dir, seed=7)
    clip = OpenClipEmbedder(name, str(weights), device="cpu")
    images = pathlib.Path(server.base_dir) / "metrics_art"
    make_wikiart_folder(images, n=18)
    build_db(images, models / "atelier_style_db" / DB, clip, log=lambda m: None)
    feats, labels, info, _ = labelled_features(None, clip, db=load_db(models / "atelier_style_db" / DB))
    clf, _ = train_classifier(feats, labels, info, hidden=16, epochs=20)
    clf.save(models / "atelier_style_classifier" / CLASSIFIER)
    server.metrics_clip = CLIP_FILE
    loader = {"AtelierOpenCLIPLoader.weights": CLIP_FILE, "AtelierOpenCLIPLoader.architecture": "auto from file name"}
    common = {"EmptyLatentImage.batch_size": 2}
    small = {"features": "64"}
    return {
        "metrics_multistage_alpha_fid.json": {**common, **{f"AtelierAlphaFID.{k}": v for k, v in small.items()}},
        "metrics_artist_lora_vs_base.json": {**common, **loader, **{f"AtelierFID.{k}": v for k, v in small.items()}},
        "metrics_prompt_extension.json": {**common, **loader},
        "metrics_retrieval_vs_suffix.json": {**common, **loader, "AtelierStyleDBLoad.db_name": f"{DB}/manifest.json",
                                             "AtelierStyleClassifierLoad.classifier": CLASSIFIER},
    }
