"""The run directory `<storage_path>/<run_name>/`: every file training writes there, read and written here.

Ray Train owns `checkpoint_epoch_NNNN/` (we only fill them) and its own bookkeeping files; everything else is
ours: config.yaml (the resolved configuration), data_fingerprint.json (what a resume must find unchanged),
metrics.jsonl (one line per logging step, per epoch and per resume; rank 0 writes it), workers.json, curves.png,
summary.json, skipped_rows.csv, report.html (rayimgcls.report.training), tensorboard/ and mlflow.json (the MLflow
run a resume continues).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import torch

from rayimgcls import storage
from rayimgcls.card import WEIGHTS_FILE
from rayimgcls.config import ConfigError, TrainConfig, to_yaml
from rayimgcls.dataset import CLASS_TO_IDX_JSON, LABELS_CSV, Problem
from rayimgcls.text import spreadsheet_cell

CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "data_fingerprint.json"
METRICS_FILE = "metrics.jsonl"
WORKERS_FILE = "workers.json"
CURVES_FILE = "curves.png"
SUMMARY_FILE = "summary.json"
SKIPPED_FILE = "skipped_rows.csv"
REPORT_FILE = "report.html"
MLFLOW_FILE = "mlflow.json"
TENSORBOARD_DIR = "tensorboard"
MODEL_DIR = "model"
TRAIN_STATE_FILE = "train_state.pt"
EMA_WEIGHTS_FILE = "ema.safetensors"  # with --model-ema: the averaged weights, beside the raw model.safetensors
CHECKPOINT_PREFIX = "checkpoint_epoch_"


class RunDir:
    """One run directory, local or on object storage."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def of(cls, cfg: TrainConfig) -> RunDir:
        return cls(storage.join(cfg.storage_path, cfg.run_name or ""))

    def file(self, name: str) -> str:
        return storage.join(self.path, name)

    def exists(self) -> bool:
        return storage.exists(self.file(CONFIG_FILE))

    # --- config.yaml, data_fingerprint.json --------------------------------------------------------------
    def read_config(self) -> dict:
        import yaml

        return yaml.safe_load(storage.read_text(self.file(CONFIG_FILE)))

    def write_config(self, cfg: TrainConfig) -> None:
        storage.makedirs(self.path)
        storage.write_text(self.file(CONFIG_FILE), to_yaml(cfg))

    def write_fingerprint(self, fingerprint: dict[str, str | None]) -> None:
        storage.write_text(self.file(FINGERPRINT_FILE), json.dumps(fingerprint, indent=2) + "\n")

    def check_fingerprint(self, fingerprint: dict[str, str | None]) -> None:
        """Refuse to resume on other data: a checkpoint trained on one labels.csv continued on another is
        neither run. (Runs from before the fingerprint existed get one now.)"""
        path = self.file(FINGERPRINT_FILE)
        if not storage.exists(path):
            self.write_fingerprint(fingerprint)
            return
        stored = json.loads(storage.read_text(path))
        if "class_weights" not in stored and "class_weights" in fingerprint:  # a run from before it was recorded
            self.write_fingerprint({**stored, "class_weights": fingerprint["class_weights"]})
            stored["class_weights"] = fingerprint["class_weights"]
        changes = [
            f"{name}: {_short(stored.get(name))} -> {_short(fingerprint.get(name))}"
            for name in sorted(set(stored) | set(fingerprint))
            if stored.get(name) != fingerprint.get(name)
        ]
        if changes:
            raise ConfigError(
                f"run {os.path.basename(self.path)!r} was trained on other data, so it cannot resume; use a new "
                "--run-name, or restore the files. Changed since the run started (sha256):\n  " + "\n  ".join(changes)
            )

    # --- metrics.jsonl ---------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        path = self.file(METRICS_FILE)
        if not storage.exists(path):
            return []
        return [json.loads(x) for x in storage.read_text(path).splitlines() if x.strip()]

    def write_metrics(self, lines: list[dict]) -> None:
        storage.write_text(self.file(METRICS_FILE), "".join(json.dumps(x) + "\n" for x in lines))

    # --- summary.json, curves.png, workers.json, skipped_rows.csv, mlflow.json --------------------------------
    def read_summary(self) -> dict | None:
        path = self.file(SUMMARY_FILE)
        return json.loads(storage.read_text(path)) if storage.exists(path) else None

    def write_summary(self, summary: dict) -> None:
        storage.write_text(self.file(SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")

    def write_curves(self, lines: list[dict]) -> None:
        storage.write_bytes(self.file(CURVES_FILE), plot_curves(lines))

    def read_workers(self) -> list[dict]:
        return json.loads(storage.read_text(self.file(WORKERS_FILE)))

    def write_workers(self, workers: list[dict]) -> None:
        storage.write_text(self.file(WORKERS_FILE), json.dumps(workers, indent=2) + "\n")

    def write_skipped(self, problems: list[Problem]) -> str:
        """Every skipped row (line, path, reason); cells a spreadsheet would run as a formula are defused."""
        import pandas as pd

        table = pd.DataFrame(
            [
                {
                    "line": p.line,
                    "image_path": spreadsheet_cell(p.path or ""),
                    "reason": spreadsheet_cell(f"{p.code}: {p.message}"),
                }
                for p in sorted(problems, key=lambda p: p.line or 0)
            ]
        )
        storage.write_text(self.file(SKIPPED_FILE), table.to_csv(index=False))
        return self.file(SKIPPED_FILE)

    def read_skipped(self) -> list[dict]:
        """skipped_rows.csv as written (cells stay defused), or [] when no row was skipped."""
        import pandas as pd

        path = self.file(SKIPPED_FILE)
        if not storage.exists(path):
            return []
        table = pd.read_csv(io.StringIO(storage.read_text(path)), dtype=str, keep_default_na=False)
        return table.to_dict("records")

    def read_mlflow(self) -> dict | None:
        path = self.file(MLFLOW_FILE)
        return json.loads(storage.read_text(path)) if storage.exists(path) else None

    def write_mlflow(self, record: dict) -> None:
        storage.write_text(self.file(MLFLOW_FILE), json.dumps(record, indent=2) + "\n")

    # --- checkpoints ------------------------------------------------------------------------------------
    def completed_epochs(self) -> int:
        """The last epoch with a complete checkpoint."""
        return max(self.checkpoint_epochs(), default=0)

    def checkpoint_epochs(self) -> set[int]:
        """The epochs with a complete checkpoint on disk (train_state.pt is written after the weights)."""
        return {
            int(m.group(1))
            for f in storage.walk_files(self.path)
            if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)/{TRAIN_STATE_FILE}", f))
        }

    def kept_checkpoints(self, epochs: Iterable[int]) -> set[int]:
        """Which of `epochs` still have a complete checkpoint: one existence check each, not a recursive listing,
        which on S3 raced Ray Train's own checkpoint bookkeeping at the end of a job and failed ("not found")."""
        return {e for e in epochs if storage.exists(storage.join(self.path, checkpoint_dir_name(e), TRAIN_STATE_FILE))}

    def checkpoint(self, epoch: int) -> str:
        return self.file(checkpoint_dir_name(epoch))


def _short(digest: str | None) -> str:
    return "absent" if digest is None else digest[:12]


def sha256_file(path: str) -> str:
    """sha256 of a local file or object, streamed (a pretrained file may be gigabytes)."""
    fs, inner = storage.filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(data_root: str, pretrained: str | None, class_weights: str | None = None) -> dict[str, str | None]:
    """sha256 of what the run learns from: labels.csv, class_to_idx.json, a local --pretrained file (a hub
    name stands for itself) and a --class-weights file (config.yaml holds only its path)."""
    out: dict[str, str | None] = {}
    for name in (LABELS_CSV, CLASS_TO_IDX_JSON):
        path = storage.join(data_root, name)
        out[name] = sha256_file(path) if storage.exists(path) else None
    if pretrained:
        out["pretrained"] = sha256_file(pretrained) if storage.exists(pretrained) else f"hub:{pretrained}"
    if class_weights:
        out["class_weights"] = sha256_file(class_weights)
    return out


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: weights as safetensors, the rest as a torch file that loads with weights_only=True.


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    global_step: int,
    metrics: dict,
    ema: torch.nn.Module | None = None,
) -> None:
    """The raw weights (and the EMA's, with --model-ema), then the train state: a checkpoint counts as complete
    once train_state.pt is there (checkpoint_epochs)."""
    _save_weights(model, os.path.join(path, WEIGHTS_FILE))
    if ema is not None:
        _save_weights(ema, os.path.join(path, EMA_WEIGHTS_FILE))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "metrics": metrics,
    }
    torch.save(state, os.path.join(path, TRAIN_STATE_FILE))


def _save_weights(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


def load_train_state(path: str) -> dict:
    return torch.load(os.path.join(path, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)


def load_checkpoint_weights(path: str, weights: str = "raw") -> dict[str, torch.Tensor]:
    """The raw weights of a checkpoint, or with weights="ema" the EMA's (a checkpoint of a --model-ema run)."""
    from safetensors.torch import load_file

    file = os.path.join(path, EMA_WEIGHTS_FILE if weights == "ema" else WEIGHTS_FILE)
    if weights == "ema" and not os.path.exists(file):
        raise FileNotFoundError(f"{file}: this checkpoint holds no EMA weights (it was saved without --model-ema)")
    return load_file(file)


# ---------------------------------------------------------------------------------------------------------
# The metrics log


class MetricsLog:
    """metrics.jsonl as rank 0 writes it: one line per logging step and per epoch. The file is rewritten whole
    (object stores cannot append); on resume it is cut back to the checkpoint's step, so it reads as the
    uninterrupted run would. `kept` are the lines carried over (the trackers replay them)."""

    def __init__(self, run: RunDir, resume_step: int | None) -> None:
        self.run = run
        self.lines: list[dict] = []
        if resume_step is not None:
            self.lines = [x for x in run.read_metrics() if x["step"] <= resume_step]
        self.kept = list(self.lines)

    def add(self, **record: Any) -> dict:
        line = {**record, "time": round(time.time(), 3)}
        self.lines.append(line)
        self.run.write_metrics(self.lines)
        return line


# ---------------------------------------------------------------------------------------------------------
# Reports


def plot_curves(lines: list[dict]) -> bytes:
    """curves.png: loss and learning rate per step, validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [x for x in lines if x["type"] == "step"]
    epochs = [x for x in lines if x["type"] == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([x["step"] for x in steps], [x["loss"] for x in steps], label="train loss (step)")
    if any("val_loss" in e for e in epochs):
        axes[0].plot([e["step"] for e in epochs], [e.get("val_loss") for e in epochs], "o-", label="val loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot([x["step"] for x in steps], [x["lr"] for x in steps])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    shown = [key for key in ("top1", "top5", "macro_f1", "map", "micro_f1") if any(key in e for e in epochs)]
    for key in shown:
        axes[2].plot([e["epoch"] for e in epochs], [e.get(key) for e in epochs], "o-", label=key)
    axes[2].set_xlabel("epoch")
    if shown:  # no validation subset, no validation metrics
        axes[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
