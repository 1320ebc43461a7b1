"""The training data on the driver: labels.csv parsed and checked, split into train and validation rows, the
classes resolved, and with --skip-bad-rows the rows whose image cannot be used recorded in the run directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from rayimgcls.config import ConfigError, TrainConfig
from rayimgcls.dataset import LABELS_CSV, ClassInfo, DatasetError, Problem, check_rows, read_csv, resolve_classes
from rayimgcls.rundir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: pd.DataFrame
    validation: pd.DataFrame
    classes: ClassInfo
    skipped: list[Problem]


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Parse and check labels.csv on the driver; every bad row fails (default) or is skipped and recorded."""
    df = read_csv(cfg.data_root, LABELS_CSV)
    raw, _ = check_rows(df, LABELS_CSV, None, None, flag_duplicates=False)
    classes = resolve_classes(cfg.data_root, raw, cfg.num_intended_classes)
    logger.info("classes: %s", classes.source)
    labels, problems = check_rows(df, LABELS_CSV, classes.num_classes, cfg.multilabel, flag_duplicates=False)
    largest = max((max(ls) for ls in raw if ls), default=-1)
    if cfg.num_intended_classes is not None and largest >= cfg.num_intended_classes:
        raise ConfigError(
            f"num_intended_classes={cfg.num_intended_classes}: the data has labels up to {largest} "
            f"(allowed {largest + 1}..1000)"
        )
    if problems and not cfg.skip_bad_rows:
        raise DatasetError(problems, "\n(--skip-bad-rows skips such rows and records them in skipped_rows.csv)")
    bad_lines = {p.line for p in problems}
    df = df.assign(labels=labels)[~df["row"].isin(bad_lines)]
    train, validation = df[df["subset"] == "train"], df[df["subset"] == "validation"]
    if len(train) == 0:
        raise DatasetError([Problem(LABELS_CSV, None, "no rows with subset 'train'", "no_train_rows")])
    return PreparedData(train, validation, classes, problems)


def record_skipped(cfg: TrainConfig, data: PreparedData) -> None:
    """Skip rows whose image cannot be used (checked on Ray) and write every skipped row to the run dir."""
    from rayimgcls.data import check_images_on_ray

    rows = pd.concat([data.train, data.validation])
    data.skipped += check_images_on_ray(cfg.data_root, rows, LABELS_CSV)
    bad = {p.line for p in data.skipped}
    data.train = data.train[~data.train["row"].isin(bad)]
    data.validation = data.validation[~data.validation["row"].isin(bad)]
    if data.skipped:
        path = RunDir.of(cfg).write_skipped(data.skipped)
        logger.warning("skipped %d bad row(s); see %s", len(data.skipped), path)
