"""After training, on the driver: the best checkpoint exported as a model directory (DESIGN §4), summary.json,
curves.png and report.html; and a finished run's checkpoint exported again."""

from __future__ import annotations

import time

from rayimgcls import storage
from rayimgcls.card import ModelCard
from rayimgcls.config import TrainConfig
from rayimgcls.dataset import ClassInfo
from rayimgcls.images import PreprocessConfig
from rayimgcls.model import create_model, save_model_dir
from rayimgcls.report import training as training_report
from rayimgcls.rundir import MODEL_DIR, RunDir, load_checkpoint_weights, load_train_state
from rayimgcls.train.data import PreparedData


def best_checkpoint(result, cfg: TrainConfig, has_validation: bool):
    if has_validation and result.best_checkpoints:
        metric = cfg.metric
        sign = -1 if metric == "val_loss" else 1
        scored = [(c, m) for c, m in result.best_checkpoints if metric in m]
        if scored:
            return max(scored, key=lambda cm: sign * cm[1][metric])
    return result.checkpoint, (result.metrics or {})


def export(
    cfg: TrainConfig,
    checkpoint,
    metrics: dict,
    data_classes: ClassInfo,
    model_kwargs: dict,
    pre: PreprocessConfig,
    summary: dict,
) -> str:
    """Write the best checkpoint as the model directory (DESIGN §4)."""
    out = cfg.output_dir or RunDir.of(cfg).file(MODEL_DIR)
    with checkpoint.as_directory() as d:
        state = load_train_state(d)
        which = state["metrics"].get("weights", "raw")  # with --model-ema: the better of the two (train.ema)
        weights = load_checkpoint_weights(d, which)
    epoch = state["epoch"]
    model, _ = create_model(cfg.model, data_classes.num_classes, model_kwargs=model_kwargs)
    model.load_state_dict(weights)
    card = ModelCard(
        cfg.model,
        model_kwargs,
        data_classes.num_classes,
        cfg.multilabel,
        data_classes.names,
        pre,
        precision=cfg.precision,
        training={**summary, "exported_epoch": epoch, "exported_weights": which, "exported_metrics": metrics},
    )
    save_model_dir(model, card, out)
    return out


def reexport(cfg: TrainConfig, data: PreparedData, model_kwargs: dict, pre: PreprocessConfig) -> dict:
    """A finished run: export its best checkpoint again (to a new --output-dir, say). Nothing trains, so Ray is
    not started, and the summary keeps the figures of the run; only model_dir changes."""
    print(f"run {cfg.run_name} is complete; exporting its best checkpoint again", flush=True)
    run_dir = RunDir.of(cfg)
    summary = run_dir.read_summary() or {}
    checkpoint, best = best_checkpoint(_load_result(run_dir), cfg, bool(len(data.validation)))
    summary["model_dir"] = export(
        cfg, checkpoint, best, data.classes, model_kwargs, pre, {k: v for k, v in summary.items() if k != "model_dir"}
    )
    run_dir.write_summary(summary)
    print(f"model directory: {summary['model_dir']}", flush=True)
    return summary


def _load_result(run_dir: RunDir):
    from ray.train import Result

    path, filesystem = storage.train_storage(run_dir.path)
    return Result.from_path(path, storage_filesystem=filesystem)


def finish(
    cfg: TrainConfig, data: PreparedData, model_kwargs: dict, pre: PreprocessConfig, started: float, result
) -> dict:
    """Export the best checkpoint, write summary.json and curves.png, print the summary table."""
    run_dir = RunDir.of(cfg)
    lines = run_dir.read_metrics()
    epochs = [x for x in lines if x["type"] == "epoch"]
    steps = [x for x in lines if x["type"] == "step"]
    checkpoint, best = best_checkpoint(result, cfg, bool(len(data.validation)))
    summary = {
        "run_name": cfg.run_name,
        "completed": True,
        "epochs": epochs[-1]["epoch"] if epochs else 0,  # the epochs run: fewer than num_epochs if stopped early
        "num_epochs": cfg.num_epochs,
        "stopped_early": bool(epochs) and epochs[-1]["epoch"] < cfg.num_epochs,  # early stopping (else a crash)
        "steps": epochs[-1]["step"] if epochs else 0,
        "metric": cfg.metric,
        "best_epoch": best.get("epoch"),
        "weights": best.get("weights", "raw"),  # which weights the best epoch stands for: "ema" | "raw"
        "best": {k: v for k, v in best.items() if isinstance(v, float | int)},
        "final": epochs[-1] if epochs else {},
        "num_classes": data.classes.num_classes,
        "num_train": len(data.train),
        "num_validation": len(data.validation),
        "skipped_rows": len(data.skipped),
        "images_per_s": round(sum(x["images_per_s"] for x in steps) / len(steps), 1) if steps else None,
        "seconds": round(time.time() - started, 1),
    }
    summary["model_dir"] = export(cfg, checkpoint, best, data.classes, model_kwargs, pre, summary)
    run_dir.write_summary(summary)
    run_dir.write_curves(lines)
    report = training_report.write_training_report(run_dir)
    best_value = summary["best"].get(cfg.metric)
    if best_value is not None:
        print(f"best {cfg.metric} {best_value:.4f} at epoch {summary['best_epoch']}", flush=True)
    print(f"run directory: {run_dir.path}\nreport: {report}\nmodel directory: {summary['model_dir']}", flush=True)
    return summary
