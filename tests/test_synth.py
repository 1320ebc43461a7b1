"""synth.py: deterministic, in the SambaStudio format, varied files, and not solvable by colour alone."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter

import numpy as np
from PIL import Image

from rayimgcls.synth import SHAPES, SynthConfig, make_dataset


def digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    cfg = SynthConfig(num_images=40, seed=7)
    a, b = make_dataset(tmp_path / "a", cfg), make_dataset(tmp_path / "b", cfg)
    assert digest(a) == digest(b)
    c = make_dataset(tmp_path / "c", SynthConfig(num_images=40, seed=8))
    assert digest(a) != digest(c)


def test_format_and_variety(shapes_root):
    rows = list(csv.DictReader((shapes_root / "labels.csv").open()))
    assert list(rows[0]) == ["image_path", "label", "subset", "metadata"]
    assert json.loads((shapes_root / "class_to_idx.json").read_text()) == {s: i for i, s in enumerate(SHAPES[:4])}
    assert Counter(r["label"] for r in rows) == {str(i): 50 for i in range(4)}
    assert {r["subset"] for r in rows} == {"train", "validation", "test"}
    predictions = list(csv.DictReader((shapes_root / "predictions.csv").open()))
    assert predictions == [r for r in rows if r["subset"] == "test"]
    kinds = {Image.open(shapes_root / r["image_path"]).format for r in rows}
    modes = {Image.open(shapes_root / r["image_path"]).mode for r in rows}
    sizes = {Image.open(shapes_root / r["image_path"]).size for r in rows}
    assert kinds == {"JPEG", "PNG"} and {"RGB", "L", "RGBA"} <= modes and len(sizes) > 50
    assert any(r["metadata"] == "exif-rotated" for r in rows)


def test_multilabel_rows_hold_several_sorted_labels(multilabel_root):
    rows = list(csv.DictReader((multilabel_root / "labels.csv").open()))
    labels = [[int(x) for x in r["label"].split()] for r in rows]
    assert all(ls == sorted(set(ls)) and 1 <= len(ls) <= 3 for ls in labels)
    assert Counter(len(ls) for ls in labels).keys() == {1, 2, 3}


def colour_histogram(path, bins: int = 4) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=np.int64) // (256 // bins)
    idx = img[..., 0] * bins * bins + img[..., 1] * bins + img[..., 2]
    hist = np.bincount(idx.ravel(), minlength=bins**3).astype(np.float64)
    return hist / hist.sum()


def test_colour_alone_does_not_solve_it(tmp_path):
    """A colour-histogram nearest-centroid classifier stays within 10 points of chance."""
    root = make_dataset(tmp_path, SynthConfig(num_images=600, num_classes=4, seed=11))
    rows = list(csv.DictReader((root / "labels.csv").open()))
    x = np.stack([colour_histogram(root / r["image_path"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    train = np.array([r["subset"] == "train" for r in rows])
    centroids = np.stack([x[train & (y == c)].mean(axis=0) for c in range(4)])
    pred = np.argmin(((x[~train, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((pred == y[~train]).mean())
    assert abs(accuracy - 0.25) <= 0.10, accuracy
