"""Style databases in the model folders (``models/atelier_style_db``): the names the Style DB Load node lists,
finding one by name, and the Style DB Build node's work (checks, build / resume / rebuild / add, report).

The folders and file lists come from the caller (``host.folders`` in ComfyUI), so nothing here imports ComfyUI.
"""
from __future__ import annotations

import os

from ..common.progress import NO_PROGRESS
from .build import add_to_db, build_db
from .db import MANIFEST, load_db

BUILD_MODES = ("build or resume", "rebuild", "add new images")
SKIPPED_IN_REPORT = 50  # unreadable files listed one per line in the build report (all are in the manifest)


def db_names(files):
    """The '<db>/manifest.json' entries among a style-database folder's file names (ComfyUI's cached listing),
    sorted, with '/' separators. Left out: folders being written or replaced (any path part starting with '.',
    as ``common.files.atomic_folder`` names them '.<name>.<random>.tmp') and unfinished builds ('*.partial')."""
    names = []
    for name in files:
        parts = name.replace(os.sep, "/").split("/")
        if parts[-1] != MANIFEST or any(p.startswith(".") or p.endswith(".partial") for p in parts[:-1]):
            continue
        names.append("/".join(parts))
    return sorted(names)


def find_db(name, roots):
    """Directory of the database given as '<db>/manifest.json' or '<db>' in the first of ``roots`` holding it."""
    rel = name[:-len(MANIFEST)].rstrip("/\\") if name.endswith(MANIFEST) else name
    for root in roots:
        path = os.path.join(root, rel)
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return path
    raise FileNotFoundError(f"style database {rel!r} not found in {list(roots)}; build one with "
                            "'Style DB Build (Atelier)' or `python -m retrieval build`")


def db_fingerprint(name, roots):
    """Changes when the named database is rewritten (its manifest's mtime); the name when it is not found."""
    try:
        return str(os.path.getmtime(os.path.join(find_db(name, roots), MANIFEST)))
    except OSError:
        return name


def folder_fingerprint(image_folder="", db_name="", mode=""):
    """Changes when the image folder's files change (their count and newest mtime), not on every queue."""
    latest, count = 0.0, 0
    if image_folder and os.path.isdir(image_folder):
        for dirpath, _, files in os.walk(image_folder):
            for f in files:
                count += 1
                try:
                    latest = max(latest, os.path.getmtime(os.path.join(dirpath, f)))
                except OSError:
                    pass
    return f"{image_folder}|{db_name}|{mode}|{count}|{latest}"


def check_db_name(db_name):
    """The database's folder name (stripped); refuses paths, hidden names and empty names."""
    name = db_name.strip()
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise ValueError(f"Style DB Build: db_name must be a plain directory name, got {db_name!r}")
    return name


def check_image_folder(image_folder):
    """The image folder (stripped of blanks and quotes); refuses anything that is not a folder."""
    folder = image_folder.strip().strip('"')
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"Style DB Build: image_folder {image_folder!r} is not a folder; give the absolute path "
                         "of a folder of images")
    return folder


def build_style_db(root, clip, image_folder, db_name, mode=BUILD_MODES[0], batch_size=32, index="auto",
                   metadata_file="", progress=NO_PROGRESS):
    """The Style DB Build node's work: build (or resume, rebuild, add to) database ``db_name`` under ``root``
    from ``image_folder``; returns (the loaded StyleDB, report text).

    Modes: 'build or resume' continues an interrupted build with the same files and settings, else builds;
    'rebuild' discards a partial build; 'add new images' embeds only images not in the database yet (a build
    when there is no database). ``progress.check_interrupt()`` may stop it: finished chunks are kept.
    """
    if mode not in BUILD_MODES:
        raise ValueError(f"Style DB Build: mode must be one of {', '.join(BUILD_MODES)}; got {mode!r}")
    name, folder = check_db_name(db_name), check_image_folder(image_folder)
    out = os.path.join(root, name)
    meta = (metadata_file or "").strip() or None
    logs = []
    if mode == "add new images" and os.path.isfile(os.path.join(out, MANIFEST)):
        summary = add_to_db(out, folder, clip, metadata_file=meta, batch_size=batch_size, index=index,
                            progress=progress, log=logs.append)
    else:
        summary = build_db(folder, out, clip, metadata_file=meta, batch_size=batch_size, index=index,
                           progress=progress, resume=(mode != "rebuild"), log=logs.append)
        logs.append(f"built {summary['count']} images from {summary['files']} file(s); "
                    f"{len(summary['duplicates'])} duplicate(s), {len(summary['ignored'])} non-image file(s) ignored")
    logs += [f"skipped {item['path']}: {item['reason']}" for item in summary["skipped"][:SKIPPED_IN_REPORT]]
    db = load_db(out)
    return db, "\n".join(logs + ["", db.info_text()])


def import_style_db(root, source, db_name, fmt="auto", architecture="ViT-L-14", index="auto", style="",
                    progress=NO_PROGRESS):
    """The Style DB Import node's work: import the precomputed embeddings of ``source`` (no images) as database
    ``db_name`` under ``root``; returns (the loaded StyleDB, report text). Resumes an interrupted import."""
    from .importers.formats import import_source

    name = check_db_name(db_name)
    logs = []
    summary = import_source(source, os.path.join(root, name), fmt, architecture.strip() or "ViT-L-14",
                            index=index, style=style.strip() or None, progress=progress, log=logs.append)
    logs.append(f"imported {summary['count']} rows from {summary['parts']} {summary['format']} part(s)")
    db = load_db(summary["path"])
    return db, "\n".join(logs + ["", db.info_text()])
