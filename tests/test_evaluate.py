"""`rayimgcls evaluate` against numbers computed by hand on shards written by hand, and threshold tuning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VIT
from typer.testing import CliRunner

from rayimgcls.card import ModelError, read_card
from rayimgcls.cli import app
from rayimgcls.dataset import DatasetError, rows_fingerprint
from rayimgcls.evaluate import TUNED_ON_EVALUATED, evaluate, format_report
from rayimgcls.model import make_untrained_model_dir
from rayimgcls.results import ResultDirError

NAMES = ["cat", "dog", "bird"]
# labels.csv lines 2..8: image, label, subset
LABELS = [
    ("a.jpg", "0", "test"),
    ("b.jpg", "0", "test"),
    ("c.jpg", "1", "test"),
    ("d.jpg", "1", "test"),
    ("e.jpg", "2", "test"),
    ("f.jpg", "2", "validation"),
    ("g.jpg", "0", "test"),
]
PROBS = {
    "a.jpg": [0.7, 0.2, 0.1],
    "b.jpg": [0.2, 0.5, 0.3],
    "c.jpg": [0.1, 0.8, 0.1],
    "d.jpg": [0.6, 0.3, 0.1],
    "e.jpg": [0.1, 0.1, 0.8],
    "f.jpg": [0.3, 0.3, 0.4],
}  # g.jpg: an error line


def write_labels(root: Path, rows: list[tuple[str, str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{path},{label},{subset}\n" for path, label, subset in rows)
    (root / "labels.csv").write_text("image_path,label,subset\n" + text)


def write_result(
    out: Path, root: Path, model: dict, lines: list[dict], csv: str = "labels.csv", per_shard: int = 4
) -> None:
    """A result dir as `rayimgcls infer` leaves it (DESIGN §5), written by hand."""
    out.mkdir(parents=True)
    shards = []
    for k, start in enumerate(range(0, len(lines), per_shard)):
        chunk = lines[start : start + per_shard]
        name = f"predictions-{k:05d}.jsonl"
        (out / name).write_text("".join(json.dumps(x) + "\n" for x in chunk))
        shards.append(
            {
                "file": name,
                "index": k,
                "start": start,
                "stop": start + len(chunk),
                "first_row": chunk[0]["row"],
                "last_row": chunk[-1]["row"],
            }
        )
    manifest = {
        "format": 1,
        "model": model,
        "shards": shards,
        "complete": True,
        "settings": {"precision": "fp32", "top_k": 5, "rows_per_shard": per_shard},
        "input": {
            "kind": "csv",
            "data_root": str(root),
            "csv": csv,
            "subset": None,
            "rows": len(lines),
            "sha256": rows_fingerprint([x["row"] for x in lines], [x["input"] for x in lines]),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def multiclass_model(**kw) -> dict:
    return {
        "dir": "nowhere",
        "name": "hand",
        "version": "v1",
        "num_classes": 3,
        "multilabel": False,
        "class_names": NAMES,
        "thresholds": [],
        **kw,
    }


@pytest.fixture
def multiclass_result(tmp_path: Path) -> tuple[Path, Path]:
    root, out = tmp_path / "mc" / "data", tmp_path / "mc" / "out"
    write_labels(root, LABELS)
    lines = [
        {"input": p, "predictions": PROBS[p], "top_k": [], "row": row}
        if p in PROBS
        else {"input": p, "row": row, "error": "cannot decode JPEG"}
        for row, (p, _, _) in enumerate(LABELS, start=2)
    ]
    write_result(out, root, multiclass_model(), lines)
    return root, out


def test_multiclass_numbers_by_hand(multiclass_result) -> None:
    root, out = multiclass_result
    report = evaluate(str(out))  # data_root from the manifest
    assert report["rows"] == {"predicted": 7, "selected": 7, "errors": 1, "unlabelled": 0, "evaluated": 6}
    assert report["errors"] == [{"row": 8, "input": "g.jpg", "error": "cannot decode JPEG"}]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["top5"] is None  # 3 classes: top-5 would be a meaningless 100%
    assert report["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    per_class = {c["class"]: (c["precision"], c["recall"], c["f1"], c["support"]) for c in report["per_class"]}
    assert per_class == {"cat": (0.5, 0.5, 0.5, 2), "dog": (0.5, 0.5, 0.5, 2), "bird": (1.0, 1.0, 1.0, 2)}
    assert report["macro_f1"] == pytest.approx(2 / 3)
    assert report["most_confused"] == [
        {"true": "cat", "predicted": "dog", "count": 1},
        {"true": "dog", "predicted": "cat", "count": 1},
    ]
    assert [(w["input"], w["predicted"], w["p_true"]) for w in report["worst"][:3]] == [
        ("b.jpg", "dog", 0.2),
        ("d.jpg", "cat", 0.3),
        ("f.jpg", "bird", 0.4),
    ]
    assert json.loads((out / "evaluation.json").read_text()) == report
    assert (out / "confusion_matrix.csv").read_text().splitlines() == [
        "true \\ predicted,cat,dog,bird",
        "cat,1,1,0",
        "dog,1,1,0",
        "bird,0,0,2",
    ]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_report(report)
    assert "accuracy 0.6667" in table and "b.jpg" in table and "cat -> dog: 1" in table


def test_subset_uses_labels_csv_subsets(multiclass_result) -> None:
    root, out = multiclass_result
    report = evaluate(str(out), str(root), subset="test")
    assert report["rows"] == {"predicted": 7, "selected": 6, "errors": 1, "unlabelled": 0, "evaluated": 5}
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert (out / "evaluation-test.json").exists() and (out / "confusion_matrix-test.png").exists()


def test_other_csv_joins_by_path_and_counts_unlabelled(tmp_path) -> None:
    root, out = tmp_path / "data", tmp_path / "out"
    write_labels(root, LABELS)
    lines = [
        {"input": "./a.jpg", "predictions": PROBS["a.jpg"], "top_k": [], "row": 2},
        {"input": "new.jpg", "predictions": PROBS["b.jpg"], "top_k": [], "row": 3},
    ]
    write_result(out, root, multiclass_model(), lines, csv="predictions.csv")
    report = evaluate(str(out))
    assert report["rows"]["unlabelled"] == 1 and report["unlabelled"] == [{"row": 3, "input": "new.jpg"}]
    assert report["rows"]["evaluated"] == 1 and report["accuracy"] == 1.0


def test_conflicting_or_bad_labels_name_the_line(tmp_path) -> None:
    root, out = tmp_path / "data", tmp_path / "out"
    write_labels(root, [*LABELS, ("a.jpg", "2", "train")])
    write_result(
        out,
        root,
        multiclass_model(),
        [{"input": "a.jpg", "predictions": PROBS["a.jpg"], "row": 2}],
        csv="predictions.csv",
    )
    with pytest.raises(DatasetError, match=r"labels.csv:2: a.jpg: labelled differently on lines 2, 9"):
        evaluate(str(out))
    write_labels(root, [("a.jpg", "7", "test")])
    with pytest.raises(DatasetError, match=r"labels.csv:2: a.jpg: label 7 outside \[0, 2\]"):
        evaluate(str(out))


def test_incomplete_or_missing_result_is_refused(multiclass_result, tmp_path) -> None:
    _, out = multiclass_result
    (out / "predictions-00001.jsonl").unlink()
    with pytest.raises(ResultDirError, match="1 of 2 shards missing .*--resume"):
        evaluate(str(out))
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no manifest.json" in result.output and "Traceback" not in result.output


def test_a_broken_or_short_shard_is_refused_naming_it(multiclass_result) -> None:
    """A bad line is named by file and line (no traceback); a shard short of a line is refused, not scored
    as if that row never existed."""
    _, out = multiclass_result
    shard = out / "predictions-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[0] + lines[1].replace('"predictions": [0.2, 0.5, 0.3]', '"predictions": [0.2, 0.5]'))
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f'{shard}:2: row 3: "predictions" is not 3 probabilities' in " ".join(result.output.split())
    shard.write_text("".join(lines[:3]))
    with pytest.raises(ResultDirError, match=r"predictions-00000.jsonl: 3 lines where the manifest plans 4"):
        evaluate(str(out))


# ---------------------------------------------------------------------------------------------------------
# Multi-label

ML_ROWS = [
    ("r1.jpg", "0", "validation"),
    ("r2.jpg", "1", "validation"),
    ("r3.jpg", "0 1", "test"),
    ("r4.jpg", "0", "test"),
]
ML_PROBS = [[0.9, 0.2], [0.6, 0.7], [0.4, 0.8], [0.3, 0.1]]


@pytest.fixture(scope="module")
def two_class_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml2") / "model"
    make_untrained_model_dir(out, num_classes=2, image_size=32, multilabel=True, model_kwargs=TINY_VIT)
    return out


@pytest.fixture
def multilabel_result(tmp_path, two_class_model) -> tuple[Path, Path, Path]:
    root, out, model = tmp_path / "data", tmp_path / "out", tmp_path / "model"
    shutil.copytree(two_class_model, model)
    write_labels(root, ML_ROWS)
    lines = [
        {"input": p, "predictions": pr, "top_k": [], "labels": [], "row": row}
        for row, ((p, _, _), pr) in enumerate(zip(ML_ROWS, ML_PROBS, strict=True), start=2)
    ]
    card = read_card(model)
    write_result(
        out,
        root,
        {
            "dir": str(model),
            "name": "hand",
            "version": card.version,
            "num_classes": 2,
            "multilabel": True,
            "class_names": ["0", "1"],
            "thresholds": [0.5, 0.5],
        },
        lines,
    )
    return root, out, model


def test_multilabel_numbers_by_hand(multilabel_result) -> None:
    _, out, _ = multilabel_result
    report = evaluate(str(out))
    # class 0: scores .9+ .6- .4+ .3+ -> AP (1/1 + 2/3 + 3/4) / 3; class 1: .8+ .7+ .2- .1- -> AP 1
    assert [c["ap"] for c in report["per_class"]] == pytest.approx([29 / 36, 1.0])
    assert report["map"] == pytest.approx((29 / 36 + 1) / 2)
    # at 0.5: class 0 tp 1 fp 1 fn 2 (P 1/2, R 1/3), class 1 tp 2 -> micro tp 3 fp 1 fn 2
    assert [c["f1"] for c in report["per_class"]] == pytest.approx([0.4, 1.0])
    assert report["micro_f1"] == pytest.approx(6 / 9) and report["macro_f1"] == pytest.approx(0.7)
    assert report["sample_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)
    assert report["worst"][0]["input"] == "r4.jpg"  # highest mean BCE: -(ln .3 + ln .9) / 2
    assert report["thresholds"]["values"] == [0.5, 0.5]


def test_tune_thresholds_on_validation_rows_only(multilabel_result) -> None:
    _, out, model = multilabel_result
    report = evaluate(str(out), subset="test", tune_thresholds=True)
    # validation rows only: class 0 scores .9 (pos) .6 (neg) -> 0.9; class 1 .2 (neg) .7 (pos) -> 0.7
    assert read_card(model).thresholds == [0.9, 0.7]
    assert report["thresholds"]["values"] == [0.9, 0.7]
    assert "tuned on 2 validation rows" in report["thresholds"]["source"]
    # test rows at (0.9, 0.7): r3 predicts {1} of {0, 1}; r4 nothing of {0} -> tp 1, fn 2: micro F1 1/2
    assert report["micro_f1"] == pytest.approx(0.5) and report["notes"] == []
    assert evaluate(str(out), tune_thresholds=True)["notes"] == [TUNED_ON_EVALUATED]


def test_tune_thresholds_refusals(multilabel_result, multiclass_result, two_class_model, tmp_path) -> None:
    _, out, model = multilabel_result
    with pytest.raises(ModelError, match="only for multi-label"):
        evaluate(str(multiclass_result[1]), tune_thresholds=True)
    other = tmp_path / "other"
    make_untrained_model_dir(other, num_classes=2, image_size=32, multilabel=True, model_kwargs=TINY_VIT, seed=1)
    with pytest.raises(ModelError, match="not the model that made these predictions"):
        evaluate(str(out), model_dir=str(other), tune_thresholds=True)
    write_labels(out.parent / "data", [(path, label, "test") for path, label, _ in ML_ROWS])
    with pytest.raises(DatasetError, match="needs predictions of validation rows"):
        evaluate(str(out), tune_thresholds=True)
    assert read_card(model).thresholds == [0.5, 0.5]


@pytest.mark.timeout(180)
def test_tuned_thresholds_are_used_by_infer(ray_session, multilabel_model_dir, multilabel_root, tmp_path) -> None:
    from rayimgcls.config import InferConfig
    from rayimgcls.infer import run_inference

    model = tmp_path / "model"
    shutil.copytree(multilabel_model_dir, model)

    def infer(out: str, **kw) -> list[dict]:
        run_inference(
            InferConfig(
                model_dir=str(model),
                data_root=str(multilabel_root),
                result_dir=str(tmp_path / out),
                csv="labels.csv",
                **kw,
            )
        )
        return [
            json.loads(x)
            for f in sorted((tmp_path / out).glob("predictions-*.jsonl"))
            for x in f.read_text().splitlines()
        ]

    infer("all")
    result = CliRunner().invoke(
        app, ["evaluate", "--result-dir", str(tmp_path / "all"), "--tune-thresholds", "--subset", "test"]
    )
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "tuned on" in result.output
    thresholds = read_card(model).thresholds
    assert thresholds != [0.5] * 4
    lines = infer("again", subset="test")
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert lines and manifest["model"]["thresholds"] == thresholds
    for x in lines:
        above = np.array(x["predictions"]) >= np.array(thresholds)
        assert x["labels"] == [str(c) for c in np.flatnonzero(above)]


# ---------------------------------------------------------------------------------------------------------
# Inputs changed since inference; output safe to open and to print (issue 10, items 8 and 10)


def _stamp_labels(out: Path, rows: list[tuple[str, str, str]]) -> None:
    """What infer records of the labels it read (their fingerprint), added to a hand-written manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["input"]["labels_sha256"] = rows_fingerprint(range(2, len(rows) + 2), [label for _, label, _ in rows])
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_rows_changed_since_inference_are_refused_with_the_difference(multiclass_result) -> None:
    root, out = multiclass_result
    write_labels(root, [LABELS[0], ("new.jpg", "1", "test"), *LABELS[1:]])  # a row inserted at line 3
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "labels.csv changed since `rayimgcls infer` read it" in result.output
    assert "line 3: 'b.jpg' -> 'new.jpg'" in result.output and "line 9: 'g.jpg' is new" in result.output
    assert not (out / "evaluation.json").exists()


def test_changed_labels_with_the_same_rows_are_scored_and_said(multiclass_result) -> None:
    root, out = multiclass_result
    _stamp_labels(out, LABELS)
    assert evaluate(str(out))["notes"] == []
    relabelled = [("b.jpg", "1", "test") if p == "b.jpg" else (p, label, s) for p, label, s in LABELS]
    write_labels(root, relabelled)  # b.jpg was predicted "dog": now right
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: the labels in labels.csv changed since inference (its rows and image paths did not)" in result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["accuracy"] == pytest.approx(5 / 6) and report["notes"]


def test_confusion_matrix_cells_and_printed_paths_are_safe(tmp_path) -> None:
    root, out = tmp_path / "data", tmp_path / "out"
    names = ['=HYPERLINK("http://x","y")', "@SUM(A1)", "-2+3"]
    rows = [("\x1b[2Ja.jpg", "0", "test"), ("b.jpg", "1", "test"), ("c.jpg", "2", "test")]
    write_labels(root, rows)
    lines = [{"input": p, "predictions": [0.2, 0.3, 0.5], "top_k": [], "row": r} for r, (p, _, _) in enumerate(rows, 2)]
    write_result(out, root, multiclass_model(class_names=names), lines)
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\\x1b[2Ja.jpg" in result.output
    import csv

    with (out / "confusion_matrix.csv").open(newline="") as f:
        cells = list(csv.reader(f))
    assert cells[0] == ["true \\ predicted", "'" + names[0], "'" + names[1], "'" + names[2]]
    assert [r[0] for r in cells[1:]] == ["'" + n for n in names]
