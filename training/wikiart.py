"""``python -m training wikiart-csv CSV_DIR --output meta.csv``: WikiArt's own label files as a --metadata-file.

The WikiArt dump that "Creative Painting with Latent Diffusion Models" retrains on (wikiart.tar.gz with its
``wikiart_csv`` folder) labels images in class-index CSVs: ``genre_train.csv`` / ``genre_val.csv`` rows are
``Style/artist_title-year.jpg,INDEX`` and ``genre_class.txt`` lines are ``INDEX name``; the same for ``style``
and ``artist``. Genre is in no file name, so this is where the trainer's ``{genre}`` comes from. The converter
joins what it finds into one CSV with a ``path`` column (the image path relative to the WikiArt folder) and
``genre`` / ``style`` / ``artist`` columns.
"""
from __future__ import annotations

import argparse
import csv
import io
import os

from ..common.artdata import words
from ..common.files import atomic_write

LABELS = ("genre", "style", "artist")


class WikiArtCsvError(ValueError):
    """The folder does not hold WikiArt's label files, or one of them is malformed."""


def label_name(kind: str, raw: str) -> str:
    """``religious_painting`` → ``religious`` (the template says "a {genre} painting"), ``Post_Impressionism`` →
    ``Post Impressionism``, ``vincent-van-gogh`` → ``Vincent Van Gogh``."""
    text = words(raw.strip())
    if kind == "genre":
        text = text.lower()
        if text.endswith(" painting"):
            text = text[: -len(" painting")]
    return text


def read_classes(path: str, kind: str) -> dict[str, str]:
    names = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            index, sep, name = line.strip().partition(" ")
            if not sep or not index.isdigit():
                raise WikiArtCsvError(f"{path} line {n}: expected 'INDEX name', got {line.strip()!r}")
            names[index] = label_name(kind, name)
    return names


def convert(csv_dir: str) -> tuple[list[dict], dict]:
    """(rows {path, genre, style, artist}, {kind: number of labelled images}) from WikiArt's label files."""
    if not os.path.isdir(csv_dir):
        raise WikiArtCsvError(f"{csv_dir!r} is not a folder; give WikiArt's wikiart_csv folder")
    rows, counts = {}, {}
    for kind in LABELS:
        class_file = os.path.join(csv_dir, f"{kind}_class.txt")
        parts = [os.path.join(csv_dir, f"{kind}_{split}.csv") for split in ("train", "val")]
        parts = [p for p in parts if os.path.isfile(p)]
        if not os.path.isfile(class_file) or not parts:
            continue
        names = read_classes(class_file, kind)
        counts[kind] = 0
        for part in parts:
            with open(part, encoding="utf-8", newline="") as f:
                for n, rec in enumerate(csv.reader(f), 1):
                    if not rec:
                        continue
                    if len(rec) < 2 or rec[1].strip() not in names:
                        raise WikiArtCsvError(f"{part} row {n}: expected 'path,class index' with an index of "
                                              f"{os.path.basename(class_file)}, got {rec!r}")
                    rows.setdefault(rec[0].strip(), {"path": rec[0].strip()})[kind] = names[rec[1].strip()]
                    counts[kind] += 1
    if not counts:
        raise WikiArtCsvError(f"no WikiArt label files in {csv_dir!r} (looked for genre_class.txt + genre_train.csv / "
                              "genre_val.csv, and the same for style and artist)")
    return [rows[k] for k in sorted(rows)], counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training wikiart-csv", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("csv_dir", help="WikiArt's wikiart_csv folder (genre_class.txt, genre_train.csv, ...)")
    p.add_argument("--output", required=True, help="CSV to write (give it to finetune as --metadata-file)")
    args = p.parse_args(argv)
    try:
        rows, counts = convert(args.csv_dir)
    except (WikiArtCsvError, OSError) as e:
        raise SystemExit(f"error: {e}")
    kinds = [k for k in LABELS if k in counts]
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["path"] + kinds, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    try:
        atomic_write(args.output, buf.getvalue())
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.output}: {e}")
    print(f"wrote {args.output}: {len(rows)} images; " + ", ".join(f"{counts[k]} with a {k}" for k in kinds))
    return 0
