"""--class-weights: none, the inverse class frequency of the train rows, or a JSON file checked whole (it is
user input) before anything trains."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from rayimgcls import storage
from rayimgcls.config import ConfigError, TrainConfig
from rayimgcls.text import printable

# The loss sums weight x loss over a batch in float32: 1e308 is inf there, 3e38 overflows the sum, 1e-320 is 0.
MIN_CLASS_WEIGHT, MAX_CLASS_WEIGHT = 1e-6, 1e6


def weights_file(cfg: TrainConfig) -> str | None:
    return None if cfg.class_weights in ("none", "auto") else cfg.class_weights


def class_weights(cfg: TrainConfig, names: list[str], train: pd.DataFrame) -> list[float] | None:
    """--class-weights: None, the inverse class frequency of the train rows (n / (classes x count), as
    scikit-learn's 'balanced'; for multi-label BCE the pos_weight negatives / positives), or a JSON file: a
    list with one weight per class or a {class name: weight} map (classes not named keep 1.0)."""
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "auto":
        counts = np.zeros(len(names))
        for labels in train["labels"]:
            counts[list(labels)] += 1
        n = len(train)
        weights = (n - counts) / np.maximum(counts, 1) if cfg.multilabel else n / (len(names) * np.maximum(counts, 1))
        return [round(float(w), 6) for w in weights]
    return read_class_weights(cfg.class_weights, names, cfg.multilabel)


CLASS_WEIGHTS_MAX_BYTES = 1 << 20  # one weight per class (<= 1000 classes) fits in a few kB


def read_class_weights(source: str, names: list[str], multilabel: bool) -> list[float]:
    """A --class-weights file: checked whole (size, duplicate keys, each weight) before anything trains. A
    multi-class weight must be > 0: a batch of zero-weight classes alone would divide by a zero weight sum (NaN);
    a multi-label pos_weight of 0 only ignores the positives of its class, but not of every class."""
    try:
        data = storage.read_range(source, 0, CLASS_WEIGHTS_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(
            f"class_weights={source!r}: cannot read it ({e}); allowed none | auto | a JSON file"
        ) from None
    if len(data) > CLASS_WEIGHTS_MAX_BYTES:
        raise ConfigError(f"class_weights={source!r}: larger than {CLASS_WEIGHTS_MAX_BYTES} bytes (1 MiB)")
    try:
        loaded = json.loads(storage.decode_text(data, source), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"class_weights={source!r}: not JSON ({e})") from None
    except (ValueError, TypeError) as e:  # a duplicate key, a text encoding error
        raise ConfigError(f"class_weights={source!r}: {e}") from None
    if isinstance(loaded, dict):
        unknown = [k for k in loaded if k not in names]
        if unknown:
            raise ConfigError(f"{source}: unknown class name(s) {', '.join(map(repr, unknown[:5]))}")
        loaded = [loaded.get(name, 1.0) for name in names]
    if not isinstance(loaded, list) or len(loaded) != len(names):
        found = f"a list of {len(loaded)}" if isinstance(loaded, list) else f"a JSON {type(loaded).__name__}"
        raise ConfigError(
            f"{source}: expected a list of {len(names)} weights or a {{class name: weight}} map; found {found}"
        )
    allowed = f"{MIN_CLASS_WEIGHT:g} <= x <= {MAX_CLASS_WEIGHT:g}" + (", or 0" if multilabel else "")
    for i, w in enumerate(loaded):
        number = isinstance(w, int | float) and not isinstance(w, bool)
        if not number or not (MIN_CLASS_WEIGHT <= w <= MAX_CLASS_WEIGHT or (multilabel and w == 0)):
            raise ConfigError(f"{source}: weight {i} ({printable(names[i])!r}) is {w!r}; allowed a number, {allowed}")
    if not any(loaded):
        raise ConfigError(f"{source}: every weight is 0 (nothing would be learned); allowed at least one > 0")
    return [float(w) for w in loaded]


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"class {printable(key)!r} is given twice")
        seen[key] = value
    return seen
