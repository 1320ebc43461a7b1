"""Predictions + labels.csv -> metrics, confusion matrix, most-confused pairs and the worst-predicted images.

Reads a result dir of `rayimgcls infer` through its manifest (so a half-written run is refused, never read
as if complete), joins every line with its label in labels.csv, and computes the numbers with `metrics.py`,
the same code training's validation uses. Nothing is dropped silently: error lines and rows without a label
are counted and listed in the report. Pure Python on the driver: no Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rayimgcls import metrics, storage
from rayimgcls.card import ModelError, read_card, write_card
from rayimgcls.dataset import (
    LABELS_CSV,
    DatasetError,
    Problem,
    check_rows,
    normalize_rel,
    read_csv,
    rows_fingerprint,
)
from rayimgcls.plots import confusion_png
from rayimgcls.report.evaluation import write_evaluation_report
from rayimgcls.results import ResultDirError, read_manifest, read_shards
from rayimgcls.text import spreadsheet_cell

EXAMPLES = 20  # error lines / unlabelled rows listed in the report
TUNED_ON_EVALUATED = "some evaluated rows tuned the thresholds: --subset test gives an unbiased figure"
LABELS_CHANGED = (
    f"the labels in {LABELS_CSV} changed since inference (its rows and image paths did not): "
    "scored against its current labels"
)


@dataclass(frozen=True)
class Predictions:
    """The lines of a result dir as columns; `probs` holds the rows without an error only."""

    manifest: dict
    frame: pd.DataFrame  # row, input, error ("" when predicted)
    probs: np.ndarray  # (rows without error, classes)


def load_predictions(result_dir: str) -> Predictions:
    """The shards into columns, one shard at a time: the probabilities go straight into one array (100,000
    lines of a 1,000-class model: 800 MB, where the lines as Python objects took 4.4 GB)."""
    manifest = read_manifest(result_dir)
    expected = manifest["input"]["rows"]
    probs = np.empty((expected, manifest["model"]["num_classes"]), dtype=np.float64)
    rows, inputs, errors, lines, predicted = [], [], [], 0, 0
    for shard in read_shards(result_dir, manifest):
        lines += len(shard.rows)
        if lines > expected:
            raise ResultDirError(f"{result_dir}: the shards hold more lines than the manifest's {expected} rows")
        probs[predicted : predicted + len(shard.probs)] = shard.probs
        predicted += len(shard.probs)
        rows.append(shard.rows)
        inputs += shard.inputs
        errors += shard.errors
    if lines < expected:
        raise ResultDirError(f"{result_dir}: the shards hold {lines} lines, the manifest's input {expected} rows")
    frame = pd.DataFrame(
        {"row": np.concatenate(rows) if rows else np.empty(0, np.int64), "input": inputs, "error": errors}
    )
    return Predictions(manifest, frame, probs[:predicted])


def attach_labels(preds: Predictions, data_root: str, notes: list[str] | None = None) -> pd.DataFrame:
    """`preds.frame` plus `labels` (list of class ids, None when labels.csv has no row for it), `subset`
    and `label_row` (its line in labels.csv). Rows join by line number and image_path when inference read
    labels.csv itself (refused when its rows changed since: see `check_same_rows`), else by the normalised
    image path. A note for the report is appended to `notes` when the labels changed but the rows did not."""
    model = preds.manifest["model"]
    table = read_csv(data_root, LABELS_CSV)
    labels, problems = check_rows(table, LABELS_CSV, model["num_classes"], model["multilabel"], flag_duplicates=False)
    right = pd.DataFrame(
        {
            "label_row": table["row"],
            "key": table["image_path"].map(normalize_rel),
            "labels": labels,
            "subset": table["subset"],
        }
    )
    source = preds.manifest["input"]
    if source["kind"] == "csv" and normalize_rel(source["csv"]) == LABELS_CSV:
        predicted = check_same_rows(preds, table)
        if notes is not None and source.get("labels_sha256") not in (
            None,
            rows_fingerprint(predicted["row"], predicted["label"]),
        ):
            notes.append(LABELS_CHANGED)
        joined = preds.frame.merge(right.drop(columns="key"), how="left", left_on="row", right_on="label_row")
    else:
        frame = preds.frame.assign(key=preds.frame["input"].map(normalize_rel))
        joined = frame.merge(_unique_paths(right), how="left", on="key").drop(columns="key")
    used = set(joined["label_row"].dropna().astype(int))
    bad = [p for p in problems if p.line in used and p.code not in ("empty_path", "bad_path")]  # labels only:
    # a bad path is already that row's error line
    if bad:
        raise DatasetError(bad)
    joined["labels"] = joined["labels"].map(lambda x: x if isinstance(x, list) else None)
    return joined


def check_same_rows(preds: Predictions, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of labels.csv that inference predicted (its subset), refusing with the difference when they
    are not the rows it read: a row added, removed or re-pathed shifts every later line, and a join by line
    would then score each prediction against another image's label. Returns those rows."""
    source = preds.manifest["input"]
    current = table if not source.get("subset") else table[table["subset"] == source["subset"]]
    if rows_fingerprint(current["row"], current["image_path"]) == source["sha256"]:
        return current
    before = dict(zip(preds.frame["row"], preds.frame["input"], strict=True))
    after = dict(zip(current["row"], current["image_path"], strict=True))
    changes = [
        f"line {r}: {before[r]!r} -> {after[r]!r}"
        for r in sorted(before.keys() & after.keys())
        if before[r] != after[r]
    ]
    changes += [f"line {r}: {before[r]!r} no longer there" for r in sorted(before.keys() - after.keys())]
    changes += [f"line {r}: {after[r]!r} is new" for r in sorted(after.keys() - before.keys())]
    changes = changes or ["the same lines and paths, in another order"]
    shown = "\n  ".join(changes[:10]) + (f"\n  ... and {len(changes) - 10} more" if len(changes) > 10 else "")
    raise ResultDirError(
        f"{LABELS_CSV} changed since `rayimgcls infer` read it (its rows and image paths, not only labels):\n  "
        f"{shown}\nrun inference again on the current file (--overwrite) to evaluate it"
    )


def _unique_paths(table: pd.DataFrame) -> pd.DataFrame:
    """One label row per image path; the same path labelled differently on two lines cannot be joined."""
    problems = []
    for key, group in table[table.duplicated("key", keep=False)].groupby("key"):
        if len({tuple(x) for x in group["labels"]}) > 1:
            lines = ", ".join(str(r) for r in group["label_row"])
            problems.append(
                Problem(
                    LABELS_CSV,
                    int(group["label_row"].iloc[0]),
                    f"labelled differently on lines {lines}",
                    "conflicting_labels",
                    key,
                )
            )
    if problems:
        raise DatasetError(problems)
    return table.drop_duplicates("key")


# ---------------------------------------------------------------------------------------------------------
# The report


def evaluate(
    result_dir: str,
    data_root: str | None = None,
    *,
    subset: str | None = None,
    model_dir: str | None = None,
    tune_thresholds: bool = False,
    worst: int = 20,
    confused: int = 10,
) -> dict:
    """Compute the report, write evaluation[-SUBSET].json (and the confusion matrix for multi-class) into
    the result dir, and return it. `tune_thresholds` (multi-label) picks per-class thresholds on the
    validation rows and writes them into the model directory's config.json first."""
    preds = load_predictions(result_dir)
    model = preds.manifest["model"]
    data_root = data_root or preds.manifest["input"]["data_root"]
    notes: list[str] = []
    joined = attach_labels(preds, data_root, notes)
    joined["p_index"] = _prob_index(joined)
    selected = joined if subset is None else joined[joined["subset"] == subset]
    failed, unlabelled = selected["error"] != "", (selected["error"] == "") & selected["labels"].isna()
    scored = selected[~failed & ~unlabelled]
    if scored.empty:
        where = f" (subset {subset!r})" if subset else ""
        raise DatasetError(
            [Problem(LABELS_CSV, None, f"no labelled, predicted rows in {result_dir}{where}", "nothing_to_evaluate")]
        )
    thresholds = {"values": model["thresholds"], "source": "the model's, as used by infer"}
    if tune_thresholds:
        thresholds = _tune(preds, joined, model_dir or model["dir"])
    report: dict[str, Any] = {
        "result_dir": result_dir,
        "data_root": data_root,
        "subset": subset or "all",
        "model": {k: model[k] for k in ("name", "version", "dir", "multilabel", "num_classes")},
        "input": preds.manifest["input"],
        "rows": {
            "predicted": len(joined),
            "selected": len(selected),
            "errors": int(failed.sum()),
            "unlabelled": int(unlabelled.sum()),
            "evaluated": len(scored),
        },
        "errors": _examples(selected[failed], ["row", "input", "error"]),
        "unlabelled": _examples(selected[unlabelled], ["row", "input"]),
        "notes": notes,
    }
    probs = _take(preds.probs, scored["p_index"].to_numpy())
    names = model["class_names"]
    if model["multilabel"]:
        tuned_here = tune_thresholds and bool((scored["subset"] == "validation").any())
        report["thresholds"] = thresholds
        report["notes"] += [TUNED_ON_EVALUATED] if tuned_here else []
        report.update(_multilabel(scored, probs, names, thresholds["values"], worst))
    else:
        report.update(_multiclass(scored, probs, names, worst, confused))
        _write_confusion(result_dir, subset, names, np.asarray(report["confusion_matrix"]))
    report = _finite(report)
    report["html"] = storage.join(result_dir, _name("report", subset, "html"))
    write_evaluation_report(report["html"], report, scored, probs)
    storage.write_text(
        storage.join(result_dir, _name("evaluation", subset, "json")), json.dumps(report, indent=2) + "\n"
    )
    return report


def _prob_index(joined: pd.DataFrame) -> pd.Series:
    """Position of each line's probabilities in `Predictions.probs` (-1 for error lines)."""
    ok = (joined["error"] == "").to_numpy()
    index = np.full(len(joined), -1)
    index[ok] = np.arange(ok.sum())
    return pd.Series(index, index=joined.index)


def _take(probs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """probs[index], without the copy (800 MB at 100,000 x 1,000) when the index takes every row in order."""
    return probs if len(index) == len(probs) and np.array_equal(index, np.arange(len(probs))) else probs[index]


def _examples(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    return [
        {c: (int(v) if c == "row" else v) for c, v in zip(columns, r, strict=True)}
        for r in frame[columns].head(EXAMPLES).itertuples(index=False)
    ]


def _name(stem: str, subset: str | None, ext: str) -> str:
    """evaluation.json for all rows, evaluation-test.json for --subset test (they do not overwrite)."""
    return f"{stem}-{subset}.{ext}" if subset else f"{stem}.{ext}"


def _tune(preds: Predictions, joined: pd.DataFrame, model_dir: str) -> dict:
    """Per-class thresholds from the validation rows only, written into the model's config.json."""
    model = preds.manifest["model"]
    if not model["multilabel"]:
        raise ModelError("--tune-thresholds: only for multi-label models (this one is multi-class)")
    val = joined[(joined["subset"] == "validation") & (joined["error"] == "") & joined["labels"].notna()]
    if val.empty:
        message = (
            "--tune-thresholds needs predictions of validation rows: run `rayimgcls infer "
            "--csv labels.csv` (all subsets, or --subset validation)"
        )
        raise DatasetError([Problem(LABELS_CSV, None, message, "no_validation_rows")])
    card = read_card(model_dir)
    if card.version != model["version"]:
        raise ModelError(
            f"{model_dir}: version {card.version[:12]} is not the model that made these "
            f"predictions ({model['version'][:12]}); pass its --model-dir"
        )
    targets = _multi_hot(val, model["num_classes"])
    values = metrics.tune_thresholds(preds.probs[val["p_index"].to_numpy()], targets)
    card.thresholds = values
    write_card(model_dir, card)
    return {"values": values, "source": f"tuned on {len(val)} validation rows, written to {model_dir}"}


def _multi_hot(frame: pd.DataFrame, num_classes: int) -> np.ndarray:
    hot = np.zeros((len(frame), num_classes), dtype=bool)
    for i, ls in enumerate(frame["labels"]):
        hot[i, ls] = True
    return hot


def _multiclass(scored: pd.DataFrame, probs: np.ndarray, names: list[str], worst: int, confused: int) -> dict:
    targets = np.array([ls[0] for ls in scored["labels"]], dtype=np.int64)
    m = metrics.multiclass_metrics(probs, targets)
    cm = np.asarray(m["confusion_matrix"])
    true, predicted = np.nonzero(cm - np.diag(np.diag(cm)))  # row-major: ties stay ordered by (true, predicted)
    top = np.argsort(-cm[true, predicted], kind="stable")[:confused]
    pairs = [
        {"true": names[i], "predicted": names[j], "count": int(cm[i, j])}
        for i, j in zip(true[top].tolist(), predicted[top].tolist(), strict=True)
    ]
    p_true = probs[np.arange(len(targets)), targets]
    preds = probs.argmax(axis=1)
    order = np.lexsort((scored["row"].to_numpy(), p_true))[:worst]
    worst_rows = [
        {
            "row": int(scored["row"].iloc[i]),
            "input": scored["input"].iloc[i],
            "true": names[targets[i]],
            "predicted": names[preds[i]],
            "p_true": float(p_true[i]),
            "p_predicted": float(probs[i, preds[i]]),
        }
        for i in order
    ]
    return {
        "accuracy": m["top1"],
        "top5": m.get("top5"),
        "macro_precision": m["macro_precision"],
        "macro_recall": m["macro_recall"],
        "macro_f1": m["macro_f1"],
        "per_class": _per_class(m, names),
        "confusion_matrix": m["confusion_matrix"],
        "most_confused": pairs,
        "worst": worst_rows,
    }


def _multilabel(scored: pd.DataFrame, probs: np.ndarray, names: list[str], thresholds: list[float], worst: int) -> dict:
    targets = _multi_hot(scored, len(names))
    m = metrics.multilabel_metrics(probs, targets, thresholds)
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = -(targets * np.log(clipped) + ~targets * np.log(1 - clipped)).mean(axis=1)
    order = np.lexsort((scored["row"].to_numpy(), -loss))[:worst]
    above = probs >= np.asarray(thresholds)[None, :]
    worst_rows = [
        {
            "row": int(scored["row"].iloc[i]),
            "input": scored["input"].iloc[i],
            "true": [names[c] for c in np.flatnonzero(targets[i])],
            "predicted": [names[c] for c in np.flatnonzero(above[i])],
            "loss": float(loss[i]),
        }
        for i in order
    ]
    return {
        "map": m["map"],
        "map_classes": m["map_classes"],
        "classes_without_positives": m["classes_without_positives"],
        "micro_f1": m["micro_f1"],
        "macro_f1": m["macro_f1_ml"],
        "sample_f1": m["sample_f1"],
        "per_class": _per_class(m, names),
        "worst": worst_rows,
    }


def _per_class(m: dict, names: list[str]) -> list[dict]:
    """metrics.py's per-class lists -> one record per class (AP too for multi-label)."""
    keys = [k for k in ("ap", "precision", "recall", "f1", "support") if k in m["per_class"]]
    return [{"class": name, **{k: m["per_class"][k][c] for k in keys}} for c, name in enumerate(names)]


def _finite(value: Any) -> Any:
    """NaN (an undefined metric) -> null, so the report is valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        if all(type(v) is int for v in value):  # a row of the confusion matrix: a million cells at 1,000 classes
            return value
        return [_finite(v) for v in value]
    return value


def _write_confusion(result_dir: str, subset: str | None, names: list[str], cm: np.ndarray) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    cells = [spreadsheet_cell(n) for n in names]  # a class name "=cmd|..." must stay text in a spreadsheet
    writer.writerow(["true \\ predicted", *cells])
    writer.writerows([name, *row] for name, row in zip(cells, cm.tolist(), strict=True))
    stem = storage.join(result_dir, _name("confusion_matrix", subset, ""))
    storage.write_text(stem + "csv", buf.getvalue())
    storage.write_bytes(stem + "png", confusion_png(names, cm))


# ---------------------------------------------------------------------------------------------------------
# Terminal output


def format_report(report: dict, rows: int = 10) -> str:
    """The report as a readable table (the JSON file has everything)."""
    r = report["rows"]
    out = [
        f"evaluation of {report['result_dir']} (model {report['model']['name']} "
        f"{report['model']['version'][:12]}, subset: {report['subset']})",
        f"rows: {r['selected']} selected, {r['errors']} errors, {r['unlabelled']} without a label "
        f"-> {r['evaluated']} evaluated (error and unlabelled rows are listed in the JSON report)",
        *(f"note: {n}" for n in report["notes"]),
    ]
    if report["model"]["multilabel"]:
        out.append(
            f"mAP {_f(report['map'])} over {report['map_classes']} classes with positives; "
            f"F1 at the thresholds: micro {_f(report['micro_f1'])}, macro {_f(report['macro_f1'])}, "
            f"per-image {_f(report['sample_f1'])}"
        )
        out.append(f"thresholds: {report['thresholds']['source']}")
        out += _table(
            ["class", "AP", "precision", "recall", "F1", "support"],
            [[c["class"], c["ap"], c["precision"], c["recall"], c["f1"], c["support"]] for c in report["per_class"]],
        )
        out.append("worst predicted (highest loss):")
        out += _table(
            ["row", "input", "true", "predicted", "loss"],
            [
                [w["row"], w["input"], " ".join(w["true"]), " ".join(w["predicted"]), w["loss"]]
                for w in report["worst"][:rows]
            ],
        )
        return "\n".join(out)
    top5 = "n/a (5 classes or fewer)" if report["top5"] is None else _f(report["top5"])
    out.append(
        f"accuracy {_f(report['accuracy'])}, top-5 {top5}; macro precision "
        f"{_f(report['macro_precision'])}, recall {_f(report['macro_recall'])}, "
        f"F1 {_f(report['macro_f1'])}"
    )
    out += _table(
        ["class", "precision", "recall", "F1", "support"],
        [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]] for c in report["per_class"]],
    )
    out.append("most confused (true -> predicted):")
    pairs = report["most_confused"][:rows]
    out += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in pairs] or ["  none"]
    out.append("worst predicted (lowest probability of the true class):")
    out += _table(
        ["row", "input", "true", "predicted", "p(true)"],
        [[w["row"], w["input"], w["true"], w["predicted"], w["p_true"]] for w in report["worst"][:rows]],
    )
    return "\n".join(out)


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[_f(v) if isinstance(v, float) or v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
