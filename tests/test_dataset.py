"""dataset.py: reading labels.csv with line numbers, every validation problem (each names file and line),
path escapes (../, absolute, symlinks), class resolution and from_folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import encode

from rayimgcls.dataset import DatasetError, check_image, from_folders, read_csv, resolve_classes, validate


def write_root(root: Path, csv_text: str, images: dict[str, bytes] | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, data in (images or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "labels.csv").write_text(csv_text)
    return root


@pytest.fixture
def jpeg() -> bytes:
    from PIL import Image

    return encode(Image.new("RGB", (20, 20), (200, 10, 10)), "JPEG")


def test_read_csv_keeps_line_numbers_across_quoted_newlines(tmp_path, jpeg):
    write_root(
        tmp_path,
        'image_path,label,subset,metadata\nimages/a.jpg,0,train,"two\nlines"\n\n./images/a.jpg,1,test,\n',
        {"images/a.jpg": jpeg},
    )
    df = read_csv(str(tmp_path))
    assert list(df["row"]) == [2, 5]  # the second record starts on line 5 (after a 2-line record, a blank)
    assert list(df["image_path"]) == ["images/a.jpg", "./images/a.jpg"]


def test_missing_file_empty_file_and_missing_columns(tmp_path):
    with pytest.raises(DatasetError, match="labels.csv: not found"):
        read_csv(str(tmp_path))
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(DatasetError, match="labels.csv:1: empty file"):
        read_csv(str(tmp_path))
    (tmp_path / "labels.csv").write_text("image_path,label,subset\n")
    with pytest.raises(DatasetError, match="no data rows"):
        read_csv(str(tmp_path))
    (tmp_path / "labels.csv").write_text("imagepath,label,subsets\nimages/a.jpg,0,train\n")
    with pytest.raises(DatasetError) as e:
        read_csv(str(tmp_path))
    text = str(e.value)
    assert "labels.csv:1: missing column 'image_path' (found 'imagepath': misnamed?)" in text
    assert "missing column 'subset' (found 'subsets': misnamed?)" in text


def test_validate_reports_every_problem_with_its_line(tmp_path, jpeg):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg)
    root = write_root(
        tmp_path / "root",
        "\n".join(
            [
                "image_path,label,subset,metadata",
                "images/ok.jpg,0,train,",  # 2 fine
                "images/ok2.jpg,x,train,",  # 3 not an integer
                "images/ok2.jpg,9,train,",  # 4 out of range (and a duplicate of line 3)
                "images/ok3.jpg,-1,train,",  # 5 negative
                "images/ok3.jpg,1,valid,",  # 6 unknown subset (duplicate of 5)
                "images/missing.jpg,1,test,",  # 7 missing file
                "images/trunc.jpg,1,train,",  # 8 truncated
                "../outside.jpg,1,train,",  # 9 escapes with ../
                f"{outside},1,train,",  # 10 absolute path
                "images/link.jpg,1,train,",  # 11 symlink pointing out
                "images/bomb.png,1,train,",  # 12 too many pixels
                "images/text.jpg,1,train,",  # 13 not an image
                "images/multi.jpg,0 1,train,",  # 14 several labels, single-label dataset
            ]
        )
        + "\n",
        {
            "images/ok.jpg": jpeg,
            "images/ok2.jpg": jpeg,
            "images/ok3.jpg": jpeg,
            "images/multi.jpg": jpeg,
            "images/trunc.jpg": jpeg[: len(jpeg) // 2],
            "images/text.jpg": b"not an image",
            "images/bomb.png": _bomb(),
        },
    )
    os.symlink(outside, root / "images" / "link.jpg")
    report = validate(str(root), num_intended_classes=3, multilabel=False, max_pixels=1_000_000)
    found = {(p.line, p.code) for p in report.problems}
    expected = {
        (3, "bad_label"),
        (4, "label_out_of_range"),
        (4, "duplicate_row"),
        (5, "label_out_of_range"),
        (6, "unknown_subset"),
        (6, "duplicate_row"),
        (7, "missing_file"),
        (8, "truncated"),
        (9, "path_escape"),
        (10, "path_escape"),
        (11, "path_escape"),
        (12, "too_many_pixels"),
        (13, "unsupported_format"),
        (14, "multiple_labels"),
    }
    assert expected <= found, expected - found
    assert not any(p.line == 2 for p in report.problems)
    assert all(str(p).startswith(f"labels.csv:{p.line}: ") for p in report.problems)
    assert "label 9 outside [0, 2]" in str(next(p for p in report.problems if p.line == 4))
    assert not report.ok


def _bomb() -> bytes:
    from PIL import Image

    return encode(Image.new("L", (3000, 3000)), "PNG")


def test_validate_checks_predictions_csv_too(tmp_path, jpeg):
    root = write_root(tmp_path, "image_path,label,subset\nimages/a.jpg,0,train\n", {"images/a.jpg": jpeg})
    (root / "predictions.csv").write_text("image_path\nimages/a.jpg\nimages/a.jpg\nimages/gone.jpg\n")
    report = validate(str(root))
    assert report.rows == {"labels.csv": 1, "predictions.csv": 3}
    assert [(p.file, p.line, p.code) for p in report.problems] == [("predictions.csv", 4, "missing_file")]


def test_class_count_comes_from_the_right_place(tmp_path):
    labels = [[0], [4]]
    assert resolve_classes(str(tmp_path), labels).num_classes == 5
    assert "largest label (4) + 1" in resolve_classes(str(tmp_path), labels).source
    (tmp_path / "class_to_idx.json").write_text(json.dumps({f"c{i}": i for i in range(7)}))
    info = resolve_classes(str(tmp_path), labels)
    assert info.num_classes == 7 and info.names[6] == "c6" and "class_to_idx.json" in info.source
    assert resolve_classes(str(tmp_path), labels, 10).num_classes == 10


def test_generated_dataset_is_clean(shapes_root):
    report = validate(str(shapes_root))
    assert report.ok, report.problems
    assert report.num_classes == 4 and sum(report.subsets.values()) == 200
    assert set(report.subsets) == {"train", "validation", "test"}


def test_multilabel_cardinality_is_reported(multilabel_root):
    report = validate(str(multilabel_root))
    assert report.ok and report.multilabel
    assert set(report.labels_per_image) <= {1, 2, 3} and len(report.labels_per_image) > 1


def test_check_image_reasons(tmp_path, jpeg):
    (tmp_path / "a.jpg").write_bytes(jpeg)
    assert check_image(str(tmp_path), "a.jpg") is None
    assert check_image(str(tmp_path), "nope.jpg")[0] == "missing_file"
    assert check_image(str(tmp_path), "../x.jpg")[0] == "path_escape"
    assert check_image(str(tmp_path), "")[0] == "path_escape"


def test_from_folders_converts_an_imagefolder_tree(tmp_path, jpeg):
    src = tmp_path / "src"
    for cls, n in (("cat", 10), ("dog", 10), ("bird", 5)):
        for i in range(n):
            (src / cls).mkdir(parents=True, exist_ok=True)
            (src / cls / f"{i}.JPG").write_bytes(jpeg)
    (src / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    df = from_folders(str(src), str(out), (0.6, 0.2, 0.2), seed=3)
    assert json.loads((out / "class_to_idx.json").read_text()) == {"bird": 0, "cat": 1, "dog": 2}
    assert len(df) == 25 and df.equals(pd.read_csv(out / "labels.csv", dtype=str, keep_default_na=False))
    assert df[df["label"] == "1"]["subset"].value_counts().to_dict() == {"train": 6, "validation": 2, "test": 2}
    assert all((out / p).is_file() for p in df["image_path"])
    assert validate(str(out)).ok
    again = from_folders(str(src), str(tmp_path / "out2"), (0.6, 0.2, 0.2), seed=3)
    assert list(again["subset"]) == list(df["subset"])  # seeded
    in_place = from_folders(str(src), str(src))
    assert in_place["image_path"].str.startswith(("bird/", "cat/", "dog/")).all()
    shutil.rmtree(out)


# ---------------------------------------------------------------------------------------------------------
# Hostile CSVs through `rayimgcls validate` (issue 10, items 1-3): each names the file and line, exits non-zero
# and never prints a traceback.


def _validate(root: Path) -> tuple[int, str]:
    from typer.testing import CliRunner

    from rayimgcls.cli import app

    result = CliRunner().invoke(app, ["validate", str(root)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    return result.exit_code, result.output


def _rows(n: int) -> list[str]:
    return [f"images/a{i}.jpg,{i % 2},train,row {i}" for i in range(n)]


HEADER = "image_path,label,subset,metadata"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # an unterminated quote used to swallow every later row into one field (and validate said OK)
        ([HEADER, *_rows(2), '"images/a2.jpg,0,train,x', *_rows(3)], "labels.csv:4: a quote opened on line 4"),
        # past 128 KiB the csv module raised a _csv.Error traceback
        ([HEADER, '"images/a2.jpg,0,train,x', *_rows(6000)], "labels.csv:2: a field starting on line 2 runs past"),
        # a quote closed later in the file swallows the rows between, then trips the csv module
        ([HEADER, '"images/a0.jpg,0,train', *_rows(2), 'images/b.jpg",1,train,x'], "labels.csv:2:"),
        ([HEADER, *_rows(2), "images/x.jpg,1,train,a,b"], "labels.csv:4: 5 fields, the header has 4"),
        ([HEADER + ",label", *_rows(2)], "labels.csv:1: column 'label' appears 2 times"),
    ],
    ids=["unterminated-quote", "unterminated-past-field-limit", "quote-closed-later", "extra-fields", "dup-column"],
)
def test_malformed_csv_structure_is_named(tmp_path, jpeg, lines, expected):
    images = {f"images/a{i}.jpg": jpeg for i in range(3)}
    write_root(tmp_path, "\n".join(lines) + "\n", images)
    code, output = _validate(tmp_path)
    assert code == 2 and expected in output, output


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [("cp1252", "labels.csv:3: byte 0xe9 is not UTF-8"), ("utf-16", "labels.csv:1: the file is UTF-16")],
)
def test_spreadsheet_encodings_name_the_line(tmp_path, jpeg, encoding, expected):
    write_root(tmp_path, "", {"images/a0.jpg": jpeg})
    text = f"{HEADER}\nimages/a0.jpg,0,train,plain\nimages/a0.jpg,1,test,café\n"
    (tmp_path / "labels.csv").write_bytes(text.encode(encoding))
    code, output = _validate(tmp_path)
    assert code == 2 and expected in output, output
    (tmp_path / "labels.csv").write_bytes(text.encode("utf-8-sig"))  # Excel's "CSV UTF-8": a BOM, accepted
    assert read_csv(str(tmp_path))["metadata"].tolist() == ["plain", "café"]


def test_control_characters_in_image_path_are_a_named_bad_row(tmp_path, jpeg):
    write_root(tmp_path, "", {"images/a0.jpg": jpeg})
    (tmp_path / "labels.csv").write_bytes(
        f"{HEADER}\nimages/a0.jpg,0,train,\nimages/a\x00.jpg,1,train,\nimages/\x1b[2Jx.jpg,1,test,\n".encode()
    )
    code, output = _validate(tmp_path)
    assert code == 1, output
    assert "labels.csv:3: images/a\\x00.jpg: the path contains the control character '\\x00'" in output
    assert "labels.csv:4: images/\\x1b[2Jx.jpg:" in output and "\x1b" not in output  # escaped for the terminal
    assert output.count("[bad_path]") == 2


@pytest.mark.timeout(60)
def test_a_huge_label_is_refused_in_constant_memory(tmp_path, jpeg):
    """One label 99999999999 made validate build a class name per integer (past 60 s)."""
    import time

    csv_text = f"{HEADER}\nimages/a0.jpg,0,train,\nimages/a0.jpg,99999999999,test,\n"
    write_root(tmp_path, csv_text, {"images/a0.jpg": jpeg})
    start = time.monotonic()
    code, output = _validate(tmp_path)
    assert time.monotonic() - start < 20
    assert code == 1 and "labels.csv:3: images/a0.jpg: label 99999999999 outside [0, 0] (at most 1000" in output
    (tmp_path / "labels.csv").write_text(f"{HEADER}\nimages/a0.jpg,{'9' * 100_000},train,\n")
    code, output = _validate(tmp_path)
    assert code == 1 and "labels.csv:2: images/a0.jpg: label 99999999999999999... outside [0, 0] (at most" in output


def test_more_than_1000_classes_are_refused(tmp_path, jpeg):
    write_root(tmp_path, f"{HEADER}\nimages/a0.jpg,0,train,\n", {"images/a0.jpg": jpeg})
    with pytest.raises(DatasetError, match=r"num_intended_classes=1500 \(given\): allowed 1..1000 classes"):
        resolve_classes(str(tmp_path), [[0]], 1500)
    (tmp_path / "class_to_idx.json").write_text(json.dumps({f"c{i}": i for i in range(1001)}))
    with pytest.raises(DatasetError, match="1001 classes from class_to_idx.json: allowed 1..1000"):
        resolve_classes(str(tmp_path), [[0]])
