"""Names in art datasets: WikiArt's (and ArtBench's) ``Style/artist-name_title-words-1916.jpg`` and metadata
tables (CSV or JSONL) that add or correct artist, style, genre, title and year per file.

Used by the style databases and the trainer, so both see the same artist and style names.
"""
import csv
import json
import os
import re

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FIELDS = ("artist", "style", "genre", "title", "year")
_YEAR = re.compile(r"^(.*?)[-_ ]((?:1[0-9]|20)\d\d)$")
_KEY_COLUMNS = ("path", "relative_path", "file", "filename", "image", "name")


class MetadataError(ValueError):
    """A metadata table that cannot be read; the message names the file and the row."""


def words(slug):
    """``claude-monet`` → ``Claude Monet`` (words already capitalised stay as they are)."""
    return " ".join(w.capitalize() if w.islower() else w for w in re.split(r"[-_ ]+", slug) if w)


def parse_wikiart(rel_path):
    """WikiArt layout ``Style/artist-name_title-words-1916.jpg`` → artist, style, genre, title, year.

    Files outside a sub-folder have no style; names without '_' have no artist (the whole name is the title).
    """
    parts = rel_path.replace("\\", "/").split("/")
    style = words(parts[0]) if len(parts) > 1 else ""
    stem = os.path.splitext(parts[-1])[0]
    artist_slug, sep, title_slug = stem.partition("_")
    if not sep:
        artist_slug, title_slug = "", stem
    year = ""
    m = _YEAR.match(title_slug)
    if m:
        title_slug, year = m.group(1), m.group(2)
    return {"artist": words(artist_slug), "style": style, "genre": "", "title": words(title_slug), "year": year}


def load_metadata_table(path):
    """CSV or JSONL rows keyed by their file column (path/file/filename/image); values override parsed ones."""
    if not path:
        return {}
    path = str(path)
    if not os.path.isfile(path):
        raise MetadataError(f"metadata file not found: '{path}'")
    if path.lower().endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise MetadataError(f"metadata file '{path}' line {n} is not JSON ({exc})") from None
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    table = {}
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise MetadataError(f"metadata file '{path}' row {n + 1} is not an object with columns")
        key = next((str(row[c]) for c in _KEY_COLUMNS if row.get(c)), None)
        if key is None:
            raise MetadataError(f"metadata file '{path}' row {n + 1} has no file column (one of {_KEY_COLUMNS})")
        table[key.replace("\\", "/")] = {k: ("" if v is None else str(v)) for k, v in row.items()
                                         if k not in _KEY_COLUMNS}
    return table


def row_metadata(rel_path, table):
    """The parsed names of ``rel_path``, overridden by its row in ``table`` (matched by path, name or stem)."""
    meta = parse_wikiart(rel_path)
    extra = table.get(rel_path) or table.get(os.path.basename(rel_path)) or \
        table.get(os.path.splitext(os.path.basename(rel_path))[0])
    if extra:
        meta.update({k: v for k, v in extra.items() if k in FIELDS and v})
    meta["path"] = rel_path
    return meta


def image_files(root):
    """(images, others): sorted relative posix paths under ``root``, hidden files and folders left out."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            (images if os.path.splitext(name)[1].lower() in IMAGE_EXTS else others).append(rel)
    return sorted(images), sorted(others)
