"""Rank 0's validation of each epoch: loss and metrics over the whole validation subset (it is not split between
workers), of the raw weights and, with --model-ema, of their average too."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from rayimgcls.config import TrainConfig
from rayimgcls.images import PreprocessConfig, normalize
from rayimgcls.metrics import confusion_matrix, summary_metrics
from rayimgcls.train.ema import EMA, better_of


def label_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.float32 if cfg.multilabel else torch.int64


def score(
    module: torch.nn.Module,
    ema: torch.nn.Module | None,
    pre: PreprocessConfig,
    cfg: TrainConfig,
    num_classes: int,
    has_validation: bool,
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[dict, np.ndarray | None]:
    """Rank 0's validation metrics of the epoch and the confusion matrix; with --model-ema those of both weights,
    the better under the plain names (ema.better_of)."""

    def run(model: torch.nn.Module) -> tuple[dict, np.ndarray | None]:
        return evaluate(model, pre, cfg, num_classes, device, amp) if has_validation else ({}, None)

    scores, confusion = run(module)
    if ema is None:
        return scores, confusion
    ema_scores, ema_confusion = run(ema.module)
    merged = better_of(scores, ema_scores, cfg.metric)
    return merged, ema_confusion if merged["weights"] == EMA else confusion


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pre: PreprocessConfig,
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Loss and metrics over the whole validation subset (rank 0 only: it is not split between workers), and
    the confusion matrix (multi-class)."""
    import ray.train

    model.eval()
    probs, targets, loss_sum = [], [], 0.0
    shard = ray.train.get_dataset_shard("validation")
    for batch in shard.iter_torch_batches(
        batch_size=max(cfg.batch_size, 64),
        device=device,
        dtypes={"image": torch.uint8, "label": label_dtype(cfg)},
        pin_memory=device.type == "cuda",
    ):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(normalize(batch["image"], pre)).float()
        y = batch["label"]
        if cfg.multilabel:
            loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / num_classes
            probs.append(logits.sigmoid().cpu().numpy())
        else:
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            probs.append(logits.softmax(-1).cpu().numpy())
        targets.append(y.cpu().numpy())
    if not probs:
        return {}, None
    p, t = np.concatenate(probs), np.concatenate(targets)
    confusion = None if cfg.multilabel else confusion_matrix(t, p.argmax(1), num_classes)
    # Undefined metrics (NaN: e.g. mAP with no positive label) are left out; the loss is kept even when NaN, so
    # the loop can fail a diverged run (loop.check_finite) instead of silently ranking it.
    scores = summary_metrics(p, t, cfg.multilabel)
    defined = {k: v for k, v in scores.items() if not (isinstance(v, float) and math.isnan(v))}
    return {"val_loss": loss_sum / len(p), **defined}, confusion
