"""report.html of `rayimgcls evaluate`: the numbers of evaluation.json, shown, plus the pictures behind them.

Headline numbers and where they come from, the sortable per-class table, the confusion matrix (counts and
normalised), the most-confused pairs and the worst predictions as thumbnails of the images themselves (like
fastai's plot_top_losses), per-class precision-recall curves with each threshold marked (multi-label), and
the rows that could not be predicted. Everything the page shows is bounded, whatever the size of the run: at
most MAX_THUMBNAILS pictures, CM_CLASSES classes in the matrix picture, PR_CLASSES curves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rayimgcls import storage
from rayimgcls.plots import figure_png, pyplot
from rayimgcls.report.html import Column, Html, Section, facts, image, number, page, section, stats, tag, utc_now
from rayimgcls.report.html import table as html_table
from rayimgcls.report.thumbnails import Thumbnail, thumbnails
from rayimgcls.text import printable

MAX_WORST = 48  # worst predictions shown as pictures (evaluation.json lists as many as --worst asked)
PAIR_EXAMPLES = 4  # pictures per most-confused pair
MAX_PAIRS = 12
MAX_THUMBNAILS = MAX_WORST + MAX_PAIRS * PAIR_EXAMPLES
CM_CLASSES = 30  # classes the matrix picture shows by name; past that, the ones with the most errors
PR_CLASSES = 24  # precision-recall curves drawn; past that, the classes with the lowest AP
TICK_CHARS = 22  # class names on plot axes are cut to this (the tables show them whole)


def write_evaluation_report(path: str, report: dict, scored: pd.DataFrame, probs: np.ndarray) -> None:
    """Write the page for `report` (evaluate's dict). `scored`: the evaluated rows (row, input, labels),
    `probs`: their probabilities, in the same order."""
    storage.write_text(path, render(report, scored, probs))


def render(report: dict, scored: pd.DataFrame, probs: np.ndarray) -> str:
    multilabel = report["model"]["multilabel"]
    names = [m["class"] for m in report["per_class"]]
    if multilabel:
        targets = multi_hot(scored["labels"], len(names))
        worst, pairs = _worst_multilabel(report, scored, probs), []
        sections = [_summary(report), _per_class(report), _pr_curves(report, probs, targets)]
    else:
        targets = np.fromiter((ls[0] for ls in scored["labels"]), dtype=np.int64, count=len(scored))
        pairs = _pair_examples(report, scored, probs, targets)
        worst = report["worst"][:MAX_WORST]
        sections = [_summary(report), _per_class(report), _confusion(report, names)]
    pictures = thumbnails(report["data_root"], [w["input"] for w in worst] + [r for _, rs in pairs for r in rs])
    if pairs:
        sections.append(_pairs(pairs, pictures))
    sections += [_worst(report, worst, pictures), _failed(report)]
    m = report["model"]
    return page(
        f"Evaluation of {m['name']}",
        f"{report['result_dir']} · subset {report['subset']} · {utc_now()}",
        sections,
    )


def multi_hot(labels: pd.Series, num_classes: int) -> np.ndarray:
    """Lists of class ids -> (rows, classes) bool, without a Python loop per row."""
    lengths = labels.map(len).to_numpy()
    hot = np.zeros((len(labels), num_classes), dtype=bool)
    if lengths.sum():
        hot[np.repeat(np.arange(len(labels)), lengths), np.concatenate(labels.to_list()).astype(np.int64)] = True
    return hot


# ---------------------------------------------------------------------------------------------------------
# Numbers


def _summary(report: dict) -> Section:
    m, rows = report["model"], report["rows"]
    if m["multilabel"]:
        cards = [
            ("map", "mAP", report["map"], f"over {report['map_classes']} classes with positives"),
            ("micro_f1", "micro F1", report["micro_f1"], "at the thresholds"),
            ("macro_f1", "macro F1", report["macro_f1"], "at the thresholds"),
            ("sample_f1", "per-image F1", report["sample_f1"], "at the thresholds"),
        ]
    else:
        top5_hint = "5 classes or fewer" if report["top5"] is None else ""
        cards = [
            ("accuracy", "accuracy", report["accuracy"], ""),
            ("top5", "top-5", report["top5"], top5_hint),
            ("macro_precision", "macro precision", report["macro_precision"], ""),
            ("macro_recall", "macro recall", report["macro_recall"], ""),
            ("macro_f1", "macro F1", report["macro_f1"], ""),
        ]
    cards.append(("evaluated", "rows evaluated", rows["evaluated"], f"of {rows['selected']} selected"))
    source = report["input"]
    items = [
        ("model", f"{m['name']} ({'multi-label' if m['multilabel'] else 'multi-class'}, {m['num_classes']} classes)"),
        ("version", Html(tag("code", m["version"]))),
        ("model dir", m["dir"]),
        ("data root", report["data_root"]),
        ("input", source.get("csv") or source.get("images") or source["kind"]),
        ("subset", report["subset"]),
        ("result dir", report["result_dir"]),
        ("rows", f"{rows['selected']} selected: {rows['errors']} errors, {rows['unlabelled']} without a label"),
        ("written", utc_now()),
    ]
    if m["multilabel"]:
        items.insert(6, ("thresholds", report["thresholds"]["source"]))
    notes = [tag("p", f"note: {n}", class_="note") for n in report.get("notes", [])]
    return "summary", "Summary", section("summary", "Summary", stats(cards), facts(items), *notes)


def _per_class(report: dict) -> Section:
    multilabel = report["model"]["multilabel"]
    keys = ["ap", "threshold", "precision", "recall", "f1", "support"] if multilabel else []
    keys = keys or ["precision", "recall", "f1", "support"]
    titles = {"ap": "AP", "f1": "F1"}
    columns = [Column("class")] + [
        Column(titles.get(k, k), numeric=True, digits=2 if k == "threshold" else 4) for k in keys
    ]
    thresholds = report["thresholds"]["values"] if multilabel else []
    rows = (
        [c["class"]] + [thresholds[i] if k == "threshold" else c[k] for k in keys]
        for i, c in enumerate(report["per_class"])
    )
    note = "Click a column to sort." + (" Precision, recall and F1 at each class's threshold." if multilabel else "")
    return "classes", "Per class", section("classes", "Per class", html_table(columns, rows, sortable=True), note=note)


# ---------------------------------------------------------------------------------------------------------
# Figures


def _confusion(report: dict, names: list[str]) -> Section:
    cm = np.asarray(report["confusion_matrix"], dtype=np.int64)
    keep = _confused_classes(cm)
    sub = cm[np.ix_(keep, keep)]
    labels = [_tick(names[i]) for i in keep]
    share = sub / np.maximum(cm[keep].sum(axis=1, keepdims=True), 1)  # of all rows of the true class
    counts = _matrix_png(sub, sub / max(int(sub.max()), 1), labels, "counts", lambda v: str(int(v)), sub)
    normalised = _matrix_png(share, share, labels, "share of the true class (row)", lambda v: f"{v:.2f}", sub)
    note = "Rows: true class, columns: predicted. The full matrix is in confusion_matrix.csv."
    if len(keep) < len(names):
        note += f" Shown: the {len(keep)} of {len(names)} classes with the most errors (as true or predicted)."
    body = tag(
        "div",
        tag("figure", image(counts, "confusion matrix, counts")),
        tag("figure", image(normalised, "confusion matrix, normalised by row")),
        class_="figures",
    )
    return "confusion", "Confusion matrix", section("confusion", "Confusion matrix", body, note=note)


def _confused_classes(cm: np.ndarray) -> np.ndarray:
    """Every class when they fit, else the CM_CLASSES with the most errors as true or as predicted."""
    if len(cm) <= CM_CLASSES:
        return np.arange(len(cm))
    off = cm - np.diag(np.diag(cm))
    errors = off.sum(axis=0) + off.sum(axis=1)
    return np.sort(np.argsort(-errors, kind="stable")[:CM_CLASSES])


def _tick(name: str) -> str:
    name = printable(name)
    return name if len(name) <= TICK_CHARS else name[: TICK_CHARS - 1] + "…"


def _matrix_png(values, colour, labels: list[str], title: str, fmt, counts) -> bytes:
    """One heat map: `colour` in [0, 1], `values` written in each non-empty cell."""
    n = len(labels)
    side = min(2.4 + 0.34 * n, 12.0)
    with pyplot() as plt:
        fig, ax = plt.subplots(figsize=(side, side))
        ax.imshow(colour, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")  # no filter: cells are cells
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    dark = colour[i, j] > 0.55
                    ax.text(
                        j,
                        i,
                        fmt(values[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7 if n > 12 else 8,
                        color="white" if dark else "#1f2328",
                        in_layout=False,  # inside the axes: tight_layout need not measure 900 of them
                    )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        ax.spines[:].set_visible(False)
        return figure_png(fig)


def _pr_curves(report: dict, probs: np.ndarray, targets: np.ndarray) -> Section:
    per_class = report["per_class"]
    thresholds = report["thresholds"]["values"]
    with_pos = [c for c, m in enumerate(per_class) if m["ap"] is not None]
    chosen = sorted(with_pos, key=lambda c: (per_class[c]["ap"], c))[:PR_CLASSES]
    note = "Precision against recall as the threshold moves; the dot is the model's threshold."
    if len(chosen) < len(with_pos):
        note += f" Shown: the {len(chosen)} of {len(with_pos)} classes with the lowest AP."
    if len(with_pos) < len(per_class):
        note += f" {len(per_class) - len(with_pos)} classes have no positives among these rows (no curve)."
    figures = [
        tag(
            "figure",
            image(
                _pr_png(probs[:, c], targets[:, c], thresholds[c], per_class[c]), f"PR curve {per_class[c]['class']}"
            ),
        )
        for c in sorted(chosen)
    ]
    body = tag("div", *figures, class_="curves")
    return "curves", "PR curves", section("curves", "Precision-recall per class", body, note=note)


def _pr_png(scores: np.ndarray, positives: np.ndarray, threshold: float, stats_: dict) -> bytes:
    """The curve AP measures: precision at each recall step (tied scores taken together), as steps."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positives[order])
    last = np.r_[np.diff(scores[order]) != 0, True]  # one point per distinct score
    hits, ranks = hits[last], np.flatnonzero(last) + 1
    gain = np.diff(np.r_[0, hits]) > 0  # points where recall grows
    recall, precision = hits[gain] / hits[-1], hits[gain] / ranks[gain]
    step = max(1, len(recall) // 400)  # enough points for a 300-pixel plot
    above = scores >= threshold
    tp = int((above & positives).sum())
    at_p, at_r = (tp / above.sum() if above.any() else 1.0), tp / hits[-1]
    with pyplot() as plt:
        fig, ax = plt.subplots(figsize=(3.3, 2.6))
        ax.plot(
            np.r_[0, recall[::step], recall[-1]],
            np.r_[precision[0], precision[::step], precision[-1]],
            drawstyle="steps-pre",
            color="#0969da",
            lw=1.5,
        )
        ax.plot([at_r], [at_p], "o", color="#cf222e", ms=6)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        title = f"{_tick(stats_['class'])} · AP {number(stats_['ap'], 3)} · threshold {threshold:.2f} (dot)"
        ax.set_title(title, fontsize=9)
        return figure_png(fig, dpi=110)


# ---------------------------------------------------------------------------------------------------------
# Pictures of rows


def _pair_examples(
    report: dict, scored: pd.DataFrame, probs: np.ndarray, targets: np.ndarray
) -> list[tuple[dict, list[str]]]:
    """Each most-confused pair with the paths of its most confident mistakes."""
    index = {m["class"]: c for c, m in enumerate(report["per_class"])}
    if len(set(index)) < len(index):  # two classes of one name: look them up by position instead
        index = {}
    preds = probs.argmax(axis=1)
    inputs = scored["input"].to_numpy()
    out = []
    for pair in report["most_confused"][:MAX_PAIRS]:
        t, p = index.get(pair["true"]), index.get(pair["predicted"])
        rows = np.flatnonzero((targets == t) & (preds == p)) if t is not None and p is not None else np.array([], int)
        best = rows[np.argsort(-probs[rows, p], kind="stable")[:PAIR_EXAMPLES]] if len(rows) else rows
        out.append((pair, [inputs[i] for i in best]))
    return out


def _pairs(pairs: list[tuple[dict, list[str]]], pictures: dict[str, Thumbnail]) -> Section:
    blocks = [
        tag(
            "div",
            tag("h3", f"{pair['true']} → {pair['predicted']}: {pair['count']}"),
            tag("div", *(_card(pictures[p], p, []) for p in paths), class_="grid"),
            class_="pair",
        )
        for pair, paths in pairs
    ]
    note = "True class → predicted class: how often, and the images it was most sure about."
    return "pairs", "Most confused", section("pairs", "Most confused pairs", *blocks, note=note)


def _worst_multilabel(report: dict, scored: pd.DataFrame, probs: np.ndarray) -> list[dict]:
    """The worst rows with the probability of each true and predicted class."""
    worst = report["worst"][:MAX_WORST]
    position = pd.Index(scored["row"]).get_indexer([w["row"] for w in worst])
    index = {m["class"]: c for c, m in enumerate(report["per_class"])}
    return [
        {**w, "p": {name: float(probs[i, index[name]]) for name in [*w["true"], *w["predicted"]] if name in index}}
        for w, i in zip(worst, position, strict=True)
    ]


def _worst(report: dict, worst: list[dict], pictures: dict[str, Thumbnail]) -> Section:
    if report["model"]["multilabel"]:
        note = "The highest loss (mean binary cross-entropy over the classes); probabilities in brackets."

        def lines(w: dict) -> list[Html]:
            def labelled(ls: list[str]) -> str:
                return ", ".join(f"{n} ({w['p'].get(n, float('nan')):.2f})" for n in ls) or "none"

            return [
                tag("div", f"true: {labelled(w['true'])}", class_="true"),
                tag("div", f"predicted: {labelled(w['predicted'])}", class_="pred"),
                tag("div", f"loss {w['loss']:.3f}"),
            ]
    else:
        note = "The lowest probability of the true class, as fastai's top losses."

        def lines(w: dict) -> list[Html]:
            return [
                tag("div", f"true: {w['true']} ({w['p_true']:.2f})", class_="true"),
                tag("div", f"predicted: {w['predicted']} ({w['p_predicted']:.2f})", class_="pred"),
            ]

    if len(report["worst"]) > len(worst):
        note += f" The first {len(worst)} of {len(report['worst'])}; evaluation.json lists all."
    cards = [_card(pictures[w["input"]], w["input"], lines(w), row=w["row"]) for w in worst]
    body = tag("div", *cards, class_="grid") if cards else tag("p", "none (--worst 0)")
    return "worst", "Worst predictions", section("worst", "Worst predictions", body, note=note)


def _card(picture: Thumbnail, path: str, lines: Sequence[Html], row: int | None = None) -> Html:
    where = f"row {row}: {path}" if row is not None else path
    problem = tag("div", f"no picture: {picture.error}", class_="pred") if picture.error else ""
    return tag(
        "div",
        image(picture.data, path, mime=picture.mime),
        *lines,
        tag("div", where, class_="path"),
        problem,
        class_="card",
    )


def _failed(report: dict) -> Section:
    rows = report["rows"]
    parts = []
    for key, count, title, columns in (
        ("errors", rows["errors"], "Rows that could not be predicted", ["row", "input", "error"]),
        ("unlabelled", rows["unlabelled"], "Rows without a label in labels.csv", ["row", "input"]),
    ):
        listed = report[key]
        shown = f" (the first {len(listed)}; the result dir's shards hold all)" if count > len(listed) else ""
        parts.append(tag("h3", f"{title}: {count}{shown}"))
        if listed:
            table_rows = ([r[c] for c in columns] for r in listed)
            parts.append(html_table([Column(c, numeric=c == "row") for c in columns], table_rows))
    return "failed", "Errors", section("failed", "Errors and unlabelled rows", *parts)
