"""data.py on a real local Ray: decoded uint8 images, label encodings, row counts, bad rows (fail naming the
line, or kept with an error), and the parallel image check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import IMAGE_SIZE, NUM_CLASSES

from rayimgcls.data import DecodeSpec, check_images_on_ray, encode_labels, image_dataset, load_image
from rayimgcls.dataset import check_image, check_rows, read_csv
from rayimgcls.images import Augment, PreprocessConfig

PRE = PreprocessConfig(input_size=IMAGE_SIZE, crop_pct=0.9)


def labelled(root) -> pd.DataFrame:
    df = read_csv(str(root))
    labels, problems = check_rows(df, "labels.csv", NUM_CLASSES, None)
    assert not problems
    return df.assign(labels=labels)


def test_multiclass_pipeline_shapes_dtypes_and_rows(ray_session, shapes_root):
    df = labelled(shapes_root)
    out = image_dataset(df, DecodeSpec(str(shapes_root), "labels.csv", PRE, num_classes=NUM_CLASSES)).to_pandas()
    assert len(out) == len(df) and sorted(out["row"]) == sorted(df["row"])
    first = out.sort_values("row").iloc[0]
    assert first["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and first["image"].dtype == np.uint8
    expected = load_image(str(shapes_root), df.iloc[0]["image_path"], PRE)
    np.testing.assert_array_equal(first["image"], expected)  # the same path as inference and serving
    by_row = dict(zip(df["row"], df["labels"], strict=True))
    assert all(by_row[r][0] == label for r, label in zip(out["row"], out["label"], strict=True))


def test_train_transform_and_multi_hot_labels(ray_session, multilabel_root):
    df = labelled(multilabel_root)
    spec = DecodeSpec(str(multilabel_root), "labels.csv", PRE, Augment(), NUM_CLASSES, multilabel=True)
    batch = image_dataset(df, spec, shuffle_blocks=True).take_batch(len(df))
    assert batch["label"].shape == (len(df), NUM_CLASSES) and batch["label"].dtype == np.float32
    by_row = dict(zip(df["row"], df["labels"], strict=True))
    for row, hot in zip(batch["row"], batch["label"], strict=True):
        assert sorted(np.flatnonzero(hot).tolist()) == by_row[row]


def test_blocks_fan_out(ray_session, shapes_root):
    from rayimgcls.data import rows_dataset

    assert rows_dataset(read_csv(str(shapes_root))).materialize().num_blocks() >= 8  # 2 CPUs x 4


def broken_root(tmp_path, shapes_root) -> tuple[pd.DataFrame, str]:
    (tmp_path / "images").mkdir()
    good = read_csv(str(shapes_root)).iloc[:6]
    for p in good["image_path"]:
        (tmp_path / p).write_bytes((shapes_root / p).read_bytes())
    (tmp_path / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff broken")
    rows = list(good["image_path"]) + [
        "images/bad.jpg",
        "images/missing.png",
        "../escape.jpg",
        good["image_path"].iloc[0],
    ]
    lines = "\n".join(f"{p},0,train," for p in rows)
    (tmp_path / "labels.csv").write_text("image_path,label,subset,metadata\n" + lines + "\n")
    df = read_csv(str(tmp_path))
    return df.assign(labels=[[0]] * len(df)), str(tmp_path)


def test_bad_rows_fail_naming_the_line(ray_session, tmp_path, shapes_root):
    df, root = broken_root(tmp_path, shapes_root)
    ds = image_dataset(df, DecodeSpec(root, "labels.csv", PRE, num_classes=NUM_CLASSES))
    with pytest.raises(Exception, match=r"labels\.csv:(8|9|10): images/bad\.jpg|labels\.csv:(8|9|10): "):
        ds.materialize()


def test_bad_rows_kept_with_their_reason_and_nothing_dropped(ray_session, tmp_path, shapes_root):
    df, root = broken_root(tmp_path, shapes_root)
    out = image_dataset(df, DecodeSpec(root, "labels.csv", PRE, on_error="keep")).to_pandas().sort_values("row")
    assert list(out["row"]) == list(df["row"])  # every row, the duplicate included
    errors = dict(zip(out["image_path"], out["error"], strict=True))
    assert errors["images/bad.jpg"].startswith("cannot decode JPEG")
    assert errors["images/missing.png"] == "file not found"
    assert "escapes" in errors["../escape.jpg"] or "outside the data root" in errors["../escape.jpg"]
    assert (out["error"] == "").sum() == 7


def test_parallel_image_check_matches_the_local_one(ray_session, tmp_path, shapes_root):
    df, root = broken_root(tmp_path, shapes_root)
    problems = check_images_on_ray(root, df, "labels.csv")
    assert [(p.line, p.code) for p in problems] == [(8, "undecodable"), (9, "missing_file"), (10, "path_escape")]
    assert all(check_image(root, p.path)[0] == p.code for p in problems)


def test_encode_labels():
    assert encode_labels(np.array([[2], [0]], dtype=object), 3, False).tolist() == [2, 0]
    assert encode_labels(np.array([[0, 2], [1]], dtype=object), 3, True).tolist() == [[1, 0, 1], [0, 1, 0]]
