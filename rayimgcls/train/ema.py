"""--model-ema: an exponential moving average of the weights (timm's ModelEmaV3).

Rank 0 keeps it (the other ranks hold the same raw weights after every DDP step, so one average is enough),
updates it after every optimizer step, scores it on the validation subset beside the raw weights and saves it in
each checkpoint. An epoch's checkpoint stands for the better of the two: its metrics under the plain names rank
the checkpoints, feed early stopping and say which weights the export holds.
"""

from __future__ import annotations

import torch

from rayimgcls.config import TrainConfig

RAW, EMA = "raw", "ema"


def build_ema(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module | None:
    """A ModelEmaV3 of `model` (the plain module, on its device: the average is scored there), or None."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)


def better_of(raw: dict[str, float], ema: dict[str, float], metric: str) -> dict:
    """One epoch's validation metrics of both weights: `raw_<name>` and `ema_<name>`, and under the plain names
    those of the EMA weights unless the raw weights score strictly better on `metric`; `weights` says which.
    With no score to compare (no validation subset), the EMA weights: the ones the user asked for."""
    sign = -1 if metric == "val_loss" else 1
    raw_wins = metric in raw and (metric not in ema or sign * raw[metric] > sign * ema[metric])
    return {
        **{f"{RAW}_{k}": v for k, v in raw.items()},
        **{f"{EMA}_{k}": v for k, v in ema.items()},
        **(raw if raw_wins else ema),
        "weights": RAW if raw_wins else EMA,
    }
