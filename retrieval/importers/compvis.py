"""CompVis retrieval databases (latent-diffusion's ``data/rdm/retrieval_databases/<name>/*.npz``): the parts.

Each ``.npz`` holds ``embedding`` (float [n, 768], CLIP ViT-L/14 image embeddings of image patches),
``img_id`` [n] and ``patch_coords`` [n, 4] (the patch's box in its image). knn2img concatenates the parts
of a folder in file order. The images themselves are not part of these databases, so an imported database
has no image paths: its previews say "no image". The ArtBench databases are one style each
(``artbench-<style>``): the folder name gives the rows' style.
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from ..db import StyleDBError
from .engine import Part

KEYS = ("embedding", "img_id", "patch_coords")
FORMAT_NAME = "compvis-npz"


def npz_header(path, key):
    """(shape, dtype) of array ``key`` in an .npz, read from its header (the array is not loaded)."""
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
    except KeyError:
        raise StyleDBError(f"{os.path.basename(path)} has no '{key}' array; a CompVis retrieval database part "
                           f"holds {', '.join(KEYS)}") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise StyleDBError(f"{os.path.basename(path)} is not a readable .npz ({e}); the file is damaged or "
                           "not a CompVis retrieval database part") from None
    return tuple(shape), dtype


def natural_key(path):
    """Sort key that puts part_2 before part_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def part_files(source):
    """The ``.npz`` parts of a CompVis database folder (in natural order: part_2 before part_10), or the one
    file given."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise StyleDBError(f"CompVis database not found: '{source}' (give a folder of .npz parts or one .npz)")
    files = sorted((os.path.join(source, f) for f in os.listdir(source) if f.endswith(".npz")), key=natural_key)
    if not files:
        raise StyleDBError(f"no .npz parts in '{source}': a CompVis retrieval database folder holds *.npz files "
                           "with embedding, img_id and patch_coords")
    return files


def style_of(source):
    """The style of an ArtBench database named by its folder ('artbench-surrealism' → 'Surrealism'), else ''."""
    name = os.path.basename(os.path.normpath(source if os.path.isdir(source) else os.path.dirname(source)))
    if name.lower().startswith("artbench-"):
        return name[len("artbench-"):].replace("_", " ").replace("-", " ").title()
    return ""


def _reader(path, style):
    def read():
        try:
            with np.load(path, allow_pickle=False) as z:
                emb = np.asarray(z["embedding"], dtype=np.float32)
                ids = z["img_id"] if "img_id" in z.files else np.arange(len(emb))
                coords = z["patch_coords"] if "patch_coords" in z.files else None
        except ValueError as e:  # object arrays need pickle, which is never allowed
            raise StyleDBError(f"{os.path.basename(path)}: {e}; only plain arrays are read") from None
        if len(ids) != len(emb) or (coords is not None and len(coords) != len(emb)):
            raise StyleDBError(f"{os.path.basename(path)}: {len(emb)} embeddings but {len(ids)} img_id and "
                               f"{'no' if coords is None else len(coords)} patch_coords rows")
        part = os.path.basename(path)
        rows = []
        for i in range(len(emb)):
            img_id = ids[i].item() if hasattr(ids[i], "item") else ids[i]
            row = {"path": "", "style": style, "title": str(img_id), "img_id": img_id, "part": part}
            if coords is not None:
                row["patch_coords"] = [int(c) for c in np.asarray(coords[i]).reshape(-1)]
            rows.append(row)
        return emb, rows
    return read


def compvis_parts(source, style=None):
    """The :class:`Part` list of a CompVis database folder (or one .npz), headers checked."""
    style = style_of(source) if style is None else style
    parts = []
    for path in part_files(source):
        shape, dtype = npz_header(path, "embedding")
        if len(shape) != 2 or dtype.kind != "f":
            raise StyleDBError(f"{os.path.basename(path)}: 'embedding' is {dtype} {shape}; expected float [n, dim]")
        st = os.stat(path)
        parts.append(Part(os.path.basename(path), int(shape[0]), int(shape[1]), _reader(path, style),
                          f"{st.st_size}:{st.st_mtime_ns}"))
    return parts
