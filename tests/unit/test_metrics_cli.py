"""``python -m metrics``: the JSON objects the issue promises, tables, and errors as exit code 2."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from atelier.metrics import cli
from atelier.tests.fixtures.tiny_clip import make_tiny_open_clip, make_wikiart_folder
from atelier.tests.fixtures.tiny_inception import write_random_inception


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    make_wikiart_folder(d / "g", n=6)
    make_wikiart_folder(d / "i1", n=5, size=40)
    make_wikiart_folder(d / "i2", n=4, size=56)
    return d, write_random_inception(d / "weights-inception-2015-12-05-6726825d.pth")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fid_json_is_one_object(sets, capsys):
    d, w = sets
    code, out, _ = run(capsys, "fid", d / "g", d / "i1", "--inception", w, "--dims", "64", "--json", "--quiet")
    res = json.loads(out)
    assert code == 0 and set(res) >= {"fid", "n_a", "n_b", "warnings"} and (res["n_a"], res["n_b"]) == (6, 5)


def test_alpha_fid_json_reports_x_and_y(sets, capsys):
    d, w = sets
    code, out, _ = run(capsys, "stats", d / "i2", "-o", d / "i2.npz", "--inception", w, "--dims", "64", "--quiet")
    assert code == 0 and "wrote" in out
    code, out, _ = run(capsys, "alpha-fid", d / "g", d / "i1", d / "i2.npz", "--inception", w, "--dims", "64",
                       "--json", "--quiet")
    res = json.loads(out)
    assert code == 0 and res["alpha_fid"] == pytest.approx(
        np.sqrt((res["x"] ** 2 + res["y"] ** 2 + (res["x"] - res["y"]) ** 2) / 2))


def test_statistics_of_another_dimension_exit_2(sets, capsys):
    d, w = sets
    np.savez(d / "ref2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code, out, err = run(capsys, "fid", d / "g", d / "ref2048.npz", "--inception", w, "--dims", "64", "--quiet")
    assert code == 2 and out == "" and "2048-d features but the feature extractor gives 64-d" in err


def test_missing_inception_names_the_file(sets, capsys, monkeypatch):
    d, _ = sets
    monkeypatch.delenv(cli.INCEPTION_ENV, raising=False)
    code, _, err = run(capsys, "fid", d / "g", d / "i1")
    assert code == 2 and "--inception weights-inception-2015-12-05-6726825d.pth" in err


def test_style_train_and_score_with_a_baseline(sets, tmp_path, capsys):
    d, _ = sets
    name, weights = make_tiny_open_clip(tmp_path / "Atelier-Tiny-ViT.safetensors", config_dir=tmp_path)
    clip = ["--arch", name, "--weights", weights, "--model-config", tmp_path / f"{name}.json", "--quiet"]
    code, out, _ = run(capsys, "style-train", d / "g", "--out", tmp_path / "clf.safetensors", "--epochs", "5", *clip,
                       "--json")
    res = json.loads(out)
    assert code == 0 and res["labels"] == 3 and res["source"] == "image folder"
    code, out, _ = run(capsys, "style-score", tmp_path / "clf.safetensors", d / "i1", "--baseline", d / "i2", *clip,
                       "--json")
    res = json.loads(out)
    assert code == 0 and set(res["comparison"]["styles"]) == {"Cubism", "Impressionism", "Ukiyo E"}
    code, out, _ = run(capsys, "clip-score", d / "g", "--prompt", "a painting", *clip)
    assert code == 0 and "mean:" in out and "over 6 image(s)" in out


def test_module_launcher_prints_help():
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "metrics", "--help"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0 and "alpha-fid" in proc.stdout and "style-train" in proc.stdout
