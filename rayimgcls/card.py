"""config.json of a model directory (`ModelCard`): its one reader and writer, and the prediction dict it
shapes. No torch here: evaluation, result files and Serve's protocol code read cards without loading a model.

    model/
    ├── model.safetensors   weights only: loading never unpickles anything (rayimgcls.model)
    └── config.json         everything needed to rebuild the model and its preprocessing (this module)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from rayimgcls import storage
from rayimgcls.config import PRECISIONS, model_problems
from rayimgcls.images import CROP_PCT_RANGE, MEAN_RANGE, STD_RANGE, PreprocessConfig, eval_transform

SCHEMA_VERSION = 1


WEIGHTS_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


class ModelError(ValueError):
    """A model name, weights file or model directory that cannot be used."""


@dataclass
class ModelCard:
    """config.json of a model directory."""

    model_name: str
    model_kwargs: dict
    num_classes: int
    multilabel: bool
    class_names: list[str]
    preprocess: PreprocessConfig
    thresholds: list[float] = field(default_factory=list)
    precision: str = "auto"
    version: str = ""  # sha256 of model.safetensors, filled in by save_model_dir
    training: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.multilabel and not self.thresholds:
            self.thresholds = [0.5] * self.num_classes
        if problems := card_problems(self):
            raise ModelError("; ".join(problems))

    def to_json(self) -> str:
        d = asdict(self)
        model = {"name": d.pop("model_name"), "kwargs": d.pop("model_kwargs")}
        out = {"schema_version": SCHEMA_VERSION, "model": model, **d}
        return json.dumps(out, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = CONFIG_FILE) -> ModelCard:
        """Parse and check config.json: it is untrusted input (see card_problems)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ModelError(f"{source}: expected a JSON object, found {type(d).__name__}")
            if d.get("schema_version") != SCHEMA_VERSION:
                raise ModelError(f"{source}: schema_version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}")
            d.pop("schema_version")
            model, pre = d.pop("model"), d.pop("preprocess")
            if not isinstance(model, dict) or not isinstance(pre, dict):
                raise TypeError("model and preprocess must be objects")
            return cls(model_name=model["name"], model_kwargs=model["kwargs"], preprocess=_preprocess(pre), **d)
        except ModelError as e:
            raise ModelError(f"{source}: {e}" if not str(e).startswith(source) else str(e)) from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{source}: not a rayimgcls model config ({type(e).__name__}: {e})") from None


def _preprocess(d: dict) -> PreprocessConfig:
    """PreprocessConfig from config.json, refusing values the transform cannot take (its own check): the ranges
    of images.MEAN_RANGE, STD_RANGE and CROP_PCT_RANGE (a huge mean overflowed the border fill, a tiny crop_pct
    made the resize unbounded), a known interpolation and crop mode."""
    problems = [
        f"preprocess.{k}={_short(d.get(k))}: expected three numbers in [{low:g}, {high:g}]"
        for k, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE))
        if not _triple_in(d.get(k), low, high)
    ]
    size, crop, pixels = d.get("input_size"), d.get("crop_pct"), d.get("max_pixels", 1)
    if not (_integer(size) and 1 <= size <= 4096):
        problems.append(f"preprocess.input_size={_short(size)}: expected an integer 1..4096")
    low, high = CROP_PCT_RANGE
    if not (isinstance(crop, int | float) and not isinstance(crop, bool) and low <= crop <= high):
        problems.append(f"preprocess.crop_pct={_short(crop)}: allowed {low:g} <= x <= {high:g}")
    if not (_integer(pixels) and pixels >= 1):
        problems.append(f"preprocess.max_pixels={_short(pixels)}: expected an integer >= 1")
    problems += [
        f"preprocess.{k}={_short(d.get(k))}: expected a string"
        for k in ("interpolation", "crop_mode")
        if k in d and not isinstance(d[k], str)
    ]
    known = [f.name for f in fields(PreprocessConfig)]
    problems += [f"preprocess.{k}: unknown field (known: {', '.join(known)})" for k in d if k not in known]
    if problems:
        raise ModelError("; ".join(problems))
    pre = PreprocessConfig.from_dict(d)
    try:
        eval_transform(pre)  # refuses an interpolation or crop mode it does not know, naming the allowed ones
    except ValueError as e:
        raise ModelError(f"preprocess: {e}") from None
    return pre


def _triple_in(value: object, low: float, high: float) -> bool:
    """Three real numbers (not booleans) in [low, high] (NaN is in no range)."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(x, int | float) and not isinstance(x, bool) and low <= x <= high for x in value)
    )


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | list | type(None)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def card_problems(card: ModelCard) -> list[str]:
    """What makes a card unusable: a source or kwarg timm would open files for (config.model_problems), a
    class count the names or thresholds disagree with, an unknown precision."""
    problems = model_problems(card.model_name, card.model_kwargs)
    n = card.num_classes
    if not (_integer(n) and n >= 1):
        return [*problems, f"num_classes={_short(n)}: expected an integer >= 1"]
    if not isinstance(card.class_names, list) or not all(isinstance(c, str) for c in card.class_names):
        problems.append("class_names: expected a list of strings")
    elif len(card.class_names) != n:
        problems.append(f"{len(card.class_names)} class names for {n} classes")
    if isinstance(card.model_kwargs, dict) and card.model_kwargs.get("num_classes", n) != n:
        problems.append(f"model.kwargs.num_classes={card.model_kwargs['num_classes']!r} but num_classes={n}")
    thresholds = card.thresholds
    if not isinstance(thresholds, list) or not all(
        isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds
    ):
        problems.append("thresholds: expected numbers in [0, 1]")
    elif card.multilabel and len(thresholds) != n:
        problems.append(f"{len(thresholds)} thresholds for {n} classes")
    if not isinstance(card.multilabel, bool):
        problems.append(f"multilabel={_short(card.multilabel)}: expected true or false")
    if card.precision not in PRECISIONS:
        problems.append(f"precision={_short(card.precision)}: allowed {' | '.join(PRECISIONS)}")
    return problems


def read_card(model_dir: str | os.PathLike) -> ModelCard:
    """The checked card of a model directory; one without a version (the weights' sha256) is refused: its
    weights could not be verified, and a result dir could not say which model made it."""
    path = storage.join(model_dir, CONFIG_FILE)
    if not storage.exists(path):
        raise ModelError(f"{model_dir} is not a model directory: {CONFIG_FILE} not found")
    try:
        text = storage.read_text(path)
    except storage.TextEncodingError as e:
        raise ModelError(str(e)) from None
    card = ModelCard.from_json(text, path)
    if not (isinstance(card.version, str) and len(card.version) == 64 and _is_hex(card.version)):
        raise ModelError(f"{path}: version {_short(card.version)} is not the sha256 of {WEIGHTS_FILE}")
    return card


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def write_card(model_dir: str | os.PathLike, card: ModelCard) -> None:
    storage.write_text(storage.join(model_dir, CONFIG_FILE), card.to_json())


def format_prediction(probs: np.ndarray, card: ModelCard, top_k: int = 5) -> dict:
    """{"predictions": [...], "top_k": [{"index", "label", "score"}], "labels": [...] (multi-label)}."""
    k = min(top_k, card.num_classes)
    order = np.argsort(-probs, kind="stable")[:k]
    out = {
        "predictions": [float(p) for p in probs],
        "top_k": [{"index": int(i), "label": card.class_names[i], "score": float(probs[i])} for i in order],
    }
    if card.multilabel:
        out["labels"] = [name for name, p, t in zip(card.class_names, probs, card.thresholds, strict=True) if p >= t]
    return out
