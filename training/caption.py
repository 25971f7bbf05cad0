"""Machine captions for a folder of paintings (``python -m training caption DIR --model FOLDER``), as "Novel
Paintings from the Latent Diffusion Model through Transfer Learning" captions WikiArt automatically and then
drops the pairs whose CLIP similarity is below 0.2.

A local ``transformers`` image-to-text model does the captioning (families in :data:`FAMILIES`; BLIP and GIT
are tested). Each caption is merged with the WikiArt metadata template (artist, style, genre, title, year) and
written as the image's ``.txt`` sidecar, which ``python -m training finetune`` reads. A manifest,
``DIR/.atelier_captions.json``, records what this tool wrote: a ``.txt`` it did not write (or that was edited
since) is the user's own and is never overwritten unless ``--overwrite``; a run that stops (Ctrl-C, crash)
continues where it was, and the trainer knows which sidecars are merged machine captions and which images the
CLIP filter dropped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from ..common.artdata import row_metadata, load_metadata_table, MetadataError
from ..common.files import atomic_write
from ..common.progress import NO_PROGRESS, Progress, TqdmProgress
from .data import MANIFEST, DataError, fill_template, image_paths, machine_entry, read_manifest, text_hash

FAMILIES = {"blip": "BLIP", "blip-2": "BLIP-2", "git": "GIT"}
DEFAULT_CAPTION_TEMPLATE = "a {genre} painting by {artist}, {style}, {year}, {caption}"


class CaptionError(ValueError):
    """A captioning model or folder this tool cannot use; the message says why and what to do."""


# ---------------------------------------------------------------- the model
class Captioner:
    """A local image-to-text model: ``caption(pil_images) → list[str]`` in batches."""

    def __init__(self, folder: str, device: str = "auto", max_new_tokens: int = 40, num_beams: int = 3):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CaptionError(f"--model {folder!r} is not a model folder (no config.json): give the folder of a "
                               f"local {', '.join(FAMILIES.values())} captioning model (save_pretrained layout)")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise CaptionError(f"cannot read the model config in {folder!r}: {e}") from None
        if config.model_type not in FAMILIES:
            raise CaptionError(f"{folder!r} holds a {config.model_type!r} model; captions need an image-to-text "
                               f"model of the {', '.join(FAMILIES.values())} families (e.g. "
                               "Salesforce/blip-image-captioning-large, microsoft/git-large-coco)")
        self.family = config.model_type
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except Exception as e:
            raise CaptionError(f"cannot load the {FAMILIES[self.family]} model in {folder!r}: {e}") from None
        self.model.to(self.device).eval()
        self.name = os.path.basename(os.path.normpath(folder))
        self.generate_kw = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}

    def caption(self, images) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(pixel_values=pixels, **self.generate_kw)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


# ---------------------------------------------------------------- the job
def plan(root: str, manifest: dict, overwrite: bool, settings: dict):
    """(to caption, kept user captions, already done) as relative paths."""
    todo, own, done = [], [], []
    for path in image_paths(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        side = os.path.splitext(path)[0] + ".txt"
        text = open(side, encoding="utf-8").read() if os.path.exists(side) else None
        entry = machine_entry(root, rel, text, manifest)
        if text is not None and entry is None and not overwrite:
            own.append(rel)
        elif entry is not None and entry.get("settings") == settings:
            done.append(rel)
        else:
            todo.append(rel)
    return todo, own, done


def caption_folder(root: str, captioner, template: str = DEFAULT_CAPTION_TEMPLATE, metadata_file: str | None = None,
                   artist: str = "", overwrite: bool = False, batch_size: int = 8, embedder=None,
                   threshold: float = 0.2, progress: Progress = NO_PROGRESS, say=print) -> dict:
    """Caption every image of ``root`` that needs it; returns counts and the dropped pairs.

    ``embedder`` (ATELIER_CLIP contract, optional) scores each machine caption against its image; pairs below
    ``threshold`` get no sidecar and are marked dropped in the manifest (the trainer skips them).
    """
    from PIL import Image

    try:
        table = load_metadata_table(metadata_file)
    except (OSError, MetadataError) as e:
        raise DataError(f"cannot use metadata file {metadata_file}: {e}") from e
    manifest = read_manifest(root)
    settings = {"model": getattr(captioner, "name", ""), "template": template, "artist": artist,
                "clip_threshold": threshold if embedder is not None else None}
    todo, own, done = plan(root, manifest, overwrite, settings)
    stats = {"captioned": 0, "kept_own": len(own), "already_done": len(done), "dropped": [], "unreadable": []}
    for i in range(0, len(todo), batch_size):
        progress.check_interrupt()
        chunk, images = [], []
        for rel in todo[i:i + batch_size]:
            try:
                with Image.open(os.path.join(root, rel)) as im:
                    images.append(im.convert("RGB"))
                chunk.append(rel)
            except (OSError, ValueError, SyntaxError) as e:
                stats["unreadable"].append((rel, str(e)))
        if chunk:
            texts = captioner.caption(images)
            scores = _scores(embedder, images, texts) if embedder is not None else [None] * len(chunk)
            for rel, text, score in zip(chunk, texts, scores):
                _write_one(root, rel, text, score, threshold, table, template, artist, manifest, settings, stats)
            atomic_write(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        progress.update(min(i + batch_size, len(todo)), len(todo))
    return stats


def _scores(embedder, images, texts):
    import torch

    from .data import pil_to_tensor

    size = int(embedder.image_size)
    pixels = torch.stack([pil_to_tensor(im, (size, size)) for im in images])
    img = embedder.encode_image(pixels).float()
    txt = embedder.encode_text(texts).float()
    return (img * txt).sum(-1).tolist()


def _write_one(root, rel, text, score, threshold, table, template, artist, manifest, settings, stats):
    meta = row_metadata(rel, table)
    if artist:
        meta["artist"] = artist
    side = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
    entry = {"caption": text, "settings": settings, "score": None if score is None else round(score, 4)}
    if score is not None and score < threshold:
        entry["dropped"] = True
        stats["dropped"].append((rel, text, round(score, 4)))
        if os.path.exists(side):  # an earlier machine caption of ours (the user's own were filtered out above)
            os.unlink(side)
    else:
        merged = fill_template(template, {**meta, "caption": text})
        atomic_write(side, merged)
        entry.update(sha256=text_hash(merged), merged=True)
        stats["captioned"] += 1
    manifest["entries"][rel] = entry


# ---------------------------------------------------------------- command line
def build_parser():
    p = argparse.ArgumentParser(prog="python -m training caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("folder", help="folder of images (WikiArt Style/artist_title-year.jpg or any)")
    g.add_argument("--model", required=True,
                   help=f"local captioning model folder ({', '.join(FAMILIES.values())}; BLIP and GIT tested)")
    g.add_argument("--metadata-file", default=None, help="CSV/JSONL with a 'path' column adding e.g. genre per image")
    g.add_argument("--artist", default="", help="artist name for every image (default: parsed from file names)")
    g = p.add_argument_group("captions")
    g.add_argument("--template", default=DEFAULT_CAPTION_TEMPLATE,
                   help="how the sidecar is built; fields {caption} {artist} {style} {genre} {title} {year}")
    g.add_argument("--overwrite", action="store_true", help="also replace .txt captions this tool did not write")
    g.add_argument("--batch-size", type=int, default=8, help="images per generation batch")
    g.add_argument("--max-new-tokens", type=int, default=40, help="longest caption in tokens")
    g.add_argument("--num-beams", type=int, default=3, help="beam search width")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    g = p.add_argument_group("CLIP filter ('Novel Paintings from the Latent Diffusion Model through Transfer Learning')")
    g.add_argument("--clip-filter", action="store_true", help="drop captions whose CLIP similarity is below the threshold")
    g.add_argument("--clip-threshold", type=float, default=0.2, help="CLIP cosine similarity threshold")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture for the filter")
    g.add_argument("--clip-weights", default=None, help="open_clip weights file for the filter")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num_beams < 1:
        raise SystemExit("error: --batch-size, --max-new-tokens and --num-beams must be >= 1")
    try:
        image_paths(args.folder)
        if args.clip_filter and not args.clip_weights:
            raise CaptionError("--clip-filter needs --clip-weights (an open_clip weights file for --clip-model)")
        captioner = Captioner(args.model, args.device, args.max_new_tokens, args.num_beams)
        embedder = None
        if args.clip_filter:
            from ..retrieval.embedder import load_open_clip, register_folder_configs

            register_folder_configs([os.path.dirname(os.path.abspath(args.clip_weights))])
            embedder = load_open_clip(args.clip_model, args.clip_weights, device=str(captioner.device))
    except (DataError, CaptionError) as e:
        raise SystemExit(f"error: {e}")
    print(f"captioning {args.folder} with {FAMILIES[captioner.family]} ({captioner.name}) on {captioner.device}")
    progress = TqdmProgress("captioning", unit="image", enabled=args.progress)
    try:
        stats = caption_folder(args.folder, captioner, args.template, args.metadata_file, args.artist,
                               args.overwrite, args.batch_size, embedder, args.clip_threshold, progress)
    except KeyboardInterrupt:
        print("\ninterrupted: the captions written so far are kept; run the same command again to continue",
              file=sys.stderr)
        return 130
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        progress.close()
    _report(stats, args)
    return 0


def _report(stats, args):
    print(f"wrote {stats['captioned']} caption(s); {stats['already_done']} already done; kept {stats['kept_own']} "
          "of your own .txt captions" + (" (--overwrite replaces them)" if stats["kept_own"] else ""))
    for rel, reason in stats["unreadable"]:
        print(f"skipped {rel}: unreadable image: {reason}")
    if args.clip_filter:
        kept = stats["captioned"]
        print(f"CLIP filter (threshold {args.clip_threshold}): kept {kept}, dropped {len(stats['dropped'])} "
              f"(similarity below {args.clip_threshold}; no sidecar written, the trainer skips them)")
        for rel, text, score in stats["dropped"][:20]:
            print(f"  dropped {rel} (similarity {score}): {text!r}")
    print(f"train on them with: python -m training finetune --data {args.folder} --caption-mode sidecar ...")
