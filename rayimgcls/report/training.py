"""report.html of a training run: what metrics.jsonl, config.yaml, summary.json and the checkpoints say, shown.

Rank 0 rewrites it at the end of every epoch (`update`), so it can be opened while the run goes on; the driver
writes it once more when the run is finished (with the exported epoch). The curves (train and validation loss,
the checkpoint metric, learning rate, throughput, data wait), one row per epoch with its timing, the checkpoint
table (which epochs Ray Train kept, and why), the resolved configuration and the skipped rows. Bounded: the
curves are pictures whatever the number of steps, and at most MAX_SKIPPED skipped rows are listed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rayimgcls import storage
from rayimgcls.plots import figure_png, pyplot
from rayimgcls.report.html import Column, Html, Section, facts, image, page, section, stats, tag, utc_now
from rayimgcls.report.html import table as html_table
from rayimgcls.rundir import CHECKPOINT_PREFIX, REPORT_FILE, RunDir

logger = logging.getLogger(__name__)

MAX_SKIPPED = 200
METRICS = ("top1", "top5", "macro_f1", "map", "micro_f1")  # the validation metrics a table column shows
TITLES = {"val_loss": "val loss", "macro_f1": "macro F1", "micro_f1": "micro F1", "map": "mAP"}


def update(run_dir: str) -> None:
    """Rewrite report.html during a run; a page that fails costs a warning, never the training."""
    try:
        write_training_report(RunDir(run_dir))
    except Exception as e:  # noqa: BLE001 - the report is a view of files that are all written already
        logger.warning("could not write %s (%s: %s)", REPORT_FILE, type(e).__name__, e)


def write_training_report(run: RunDir) -> str:
    storage.write_text(run.file(REPORT_FILE), render(run))
    return run.file(REPORT_FILE)


def render(run: RunDir) -> str:
    config, lines, summary = run.read_config(), run.read_metrics(), run.read_summary()
    epochs = epoch_rows(lines)
    metric = config.get("checkpoint_metric") or ("map" if config.get("multilabel") else "top1")
    sections = [
        _summary(run, config, epochs, lines, summary, metric),
        _curves(lines, metric),
        _epochs(epochs),
        _checkpoints(run, config, epochs, summary, metric),
        _config(config),
    ]
    skipped = run.read_skipped()
    if skipped:
        sections.append(_skipped(skipped))
    status = "finished" if summary and summary.get("completed") else "running"
    return page(
        f"Training run {config.get('run_name')}",
        f"{run.path} · {status} · written {utc_now(seconds=True)}",
        sections,
    )


def epoch_rows(lines: list[dict]) -> list[dict]:
    """The epoch lines, each with `seconds` (since the end of the epoch before, or the attempt's start: a
    'start' or 'resume' line), and the mean throughput and data wait of its step lines."""
    out, begin, steps = [], None, []
    for line in lines:
        if line["type"] in ("start", "resume"):
            begin, steps = line["time"], []
        elif line["type"] == "step":
            steps.append(line)
        elif line["type"] == "epoch":
            row = dict(line)
            row["seconds"] = round(line["time"] - begin, 1) if begin is not None else None
            if steps:
                row["images_per_s"], row["data_wait"] = _mean(steps, "images_per_s"), _mean(steps, "data_wait")
            out.append(row)
            begin, steps = line["time"], []
    return out


# ---------------------------------------------------------------------------------------------------------


def _summary(
    run: RunDir, config: dict, epochs: list[dict], lines: list[dict], summary: dict | None, metric: str
) -> Section:
    scored = [e for e in epochs if metric in e]
    best = max(scored, key=lambda e: _sign(metric) * e[metric]) if scored else None
    steps = [x for x in lines if x["type"] == "step"]
    last = epochs[-1] if epochs else {}
    cards = [
        ("epochs", "epochs done", len(epochs), f"of {config.get('num_epochs')}"),
        (f"best_{metric}", f"best {metric}", best[metric] if best else None, f"epoch {best['epoch']}" if best else ""),
        ("train_loss", "train loss", last.get("train_loss"), "last epoch"),
        ("val_loss", "val loss", last.get("val_loss"), "last epoch"),
        # the same mean as summary.json's images_per_s: over the logged steps (whole numbers on the cards)
        ("images_per_s", "images/s", round(_mean(steps, "images_per_s")) if steps else None, "mean of the steps"),
        ("data_wait", "data wait %", round(100 * _mean(steps, "data_wait")) if steps else None, "of the time"),
    ]
    items = [
        ("model", config.get("model")),
        ("data root", config.get("data_root")),
        ("run dir", run.path),
        ("steps", f"{last.get('step', 0)} done"),
    ]
    if summary:
        items += [
            ("exported", f"epoch {summary.get('best_epoch')} -> {summary.get('model_dir')}"),
            ("took", f"{summary.get('seconds')} s"),
            ("rows", f"{summary.get('num_train')} train, {summary.get('num_validation')} validation"),
        ]
    items.append(("written", utc_now(seconds=True)))
    return "summary", "Summary", section("summary", "Summary", stats(cards), facts(items))


def _mean(lines: list[dict], key: str) -> float:
    return sum(x[key] for x in lines) / len(lines)


def _sign(metric: str) -> int:
    return -1 if metric == "val_loss" else 1


def _curves(lines: list[dict], metric: str) -> Section:
    steps = [x for x in lines if x["type"] == "step"]
    epochs = [x for x in lines if x["type"] == "epoch"]
    if not steps and not epochs:
        return "curves", "Curves", section("curves", "Curves", tag("p", "No step logged yet.", class_="note"))
    x = [s["step"] for s in steps]
    loss = [(x, [s["loss"] for s in steps], "train (step)", "-")]
    if any("val_loss" in e for e in epochs):
        loss.append(([e["step"] for e in epochs], [e.get("val_loss") for e in epochs], "validation (epoch)", "o-"))
    scored = [e for e in epochs if metric in e]
    figures = [
        ("loss", loss),
        (f"{metric} (validation)", [([e["step"] for e in scored], [e[metric] for e in scored], metric, "o-")]),
        ("learning rate", [(x, [s["lr"] for s in steps], "lr", "-")]),
        ("images/s", [(x, [s["images_per_s"] for s in steps], "images/s", "-")]),
        ("data wait (share of time)", [(x, [s["data_wait"] for s in steps], "data wait", "-")]),
    ]
    body = [tag("figure", image(_plot(series, title), title), tag("figcaption", title)) for title, series in figures]
    note = "Against the optimizer step; validation points at the end of each epoch."
    return "curves", "Curves", section("curves", "Curves", tag("div", *body, class_="curves"), note=note)


def _plot(series: Sequence[tuple[list, list, str, str]], title: str) -> bytes:
    with pyplot() as plt:
        fig, ax = plt.subplots(figsize=(4.2, 2.6))
        for xs, ys, label, style in series:
            ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        return figure_png(fig)


def _epochs(epochs: list[dict]) -> Section:
    shown = [m for m in ("val_loss", *METRICS) if any(m in e for e in epochs)]
    ema = any("weights" in e for e in epochs)  # --model-ema: the metrics shown are those of the better weights
    columns = [
        Column("epoch", numeric=True),
        Column("step", numeric=True),
        Column("seconds", numeric=True, digits=1),
        Column("train loss", numeric=True),
        *(Column(TITLES.get(m, m), numeric=True) for m in shown),
        *([Column("weights")] if ema else []),
        Column("images/s", numeric=True, digits=1),
        Column("data wait", numeric=True, digits=3),
    ]
    rows = (
        [e["epoch"], e["step"], e["seconds"], e.get("train_loss")]
        + [e.get(m) for m in shown]
        + ([e.get("weights")] if ema else [])
        + [e.get("images_per_s"), e.get("data_wait")]
        for e in epochs
    )
    note = "Seconds: the epoch's wall time (training, validation and checkpoint). Throughput: mean of its steps."
    if ema:
        note += " With --model-ema each metric is that of the better weights (raw or EMA), as the checkpoint's."
    return "epochs", "Epochs", section("epochs", "Epochs", html_table(columns, rows, sortable=True), note=note)


def _checkpoints(run: RunDir, config: dict, epochs: list[dict], summary: dict | None, metric: str) -> Section:
    on_disk = run.kept_checkpoints(e["epoch"] for e in epochs)
    keep = config.get("num_to_keep", 1)
    has_metric = any(metric in e for e in epochs)
    scores = [_sign(metric) * e[metric] for e in epochs if metric in e]
    # 1 + the epochs strictly better: tied epochs share a rank (Ray Train keeps either)
    rank = {e["epoch"]: 1 + sum(s > _sign(metric) * e[metric] for s in scores) for e in epochs if metric in e}
    exported = summary.get("best_epoch") if summary else None
    latest = epochs[-1]["epoch"] if epochs else None
    rows = []
    for e in epochs:
        n = e["epoch"]
        reasons = []
        if n == exported:
            reasons.append("exported as the model (the best)")
        if has_metric and rank.get(n, keep + 1) <= keep:
            kept = n in on_disk or summary is None  # during a run Ray Train may not have removed it yet
            reasons.append(
                f"#{rank[n]} by {metric} (num_to_keep={keep})" if kept else f"tied at #{rank[n]}: another was kept"
            )
        if n == latest:
            reasons.append("latest (a resume starts here)")
        if not reasons:
            reasons.append(f"not among the best {keep} by {metric}" if has_metric else "older than the latest")
        rows.append([n, e.get(metric), rank.get(n), "kept" if n in on_disk else "removed", "; ".join(reasons)])
    columns = [
        Column("epoch", numeric=True),
        Column(metric, numeric=True),
        Column("rank", numeric=True),
        Column("on disk"),
        Column("why"),
    ]
    order = "lowest" if _sign(metric) < 0 else "highest"
    note = f"Ray Train keeps the {keep} best by {metric} ({order} first) and the latest, in {CHECKPOINT_PREFIX}NNNN/."
    return "checkpoints", "Checkpoints", section("checkpoints", "Checkpoints", html_table(columns, rows), note=note)


def _config(config: dict) -> Section:
    rows = ([key, Html(tag("code", _value(value)))] for key, value in config.items())
    body = html_table([Column("setting"), Column("value")], rows)
    return "config", "Configuration", section("config", "Configuration", body, note="config.yaml, as resolved.")


def _value(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _skipped(skipped: list[dict]) -> Section:
    rows = ([_int(r.get("line")), r.get("image_path"), r.get("reason")] for r in skipped[:MAX_SKIPPED])
    body = html_table([Column("line", numeric=True), Column("image_path"), Column("reason")], rows)
    more = f" (the first {MAX_SKIPPED} shown; skipped_rows.csv has all)" if len(skipped) > MAX_SKIPPED else ""
    note = f"{len(skipped)} row(s) of labels.csv were skipped (--skip-bad-rows){more}."
    return "skipped", "Skipped rows", section("skipped", "Skipped rows", body, note=note)
