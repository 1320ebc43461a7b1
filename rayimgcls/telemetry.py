"""Prometheus metrics of the three stages, through Ray's own pipeline (README "Metrics").

Every metric is defined once, in METRICS, and created on first use in the process that records it (a Serve
replica, a Ray Data actor, a Ray Train worker, the driver): `ray.util.metrics` objects need a connected Ray
worker or driver, so nothing here touches Ray at import time. Each node's metrics agent exports what its
processes recorded every `metrics_report_interval_ms` (10 s by default), under Ray's `ray_` namespace:
`rayimgcls_serve_requests_total` here is `ray_rayimgcls_serve_requests_total` in Prometheus.

The endpoint's metrics also carry Serve's `application`, `deployment` and `replica` labels. Our label sets are
bounded: routes are FastAPI's templates (never raw paths), error codes and reasons come from fixed lists, classes
are indices (never names) of at most MAX_CLASS_LABELS values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Seconds from a fast GPU batch (well under 1 ms) to a slow CPU one or a big upload (tens of seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images per request / per model call (le="1" is size 1)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# Classes past this index share one label value, OTHER_CLASS: a series per class of a 20k-class model would
# cost Prometheus more than the counts tell (the top-1 confidence histogram still covers every prediction).
MAX_CLASS_LABELS = 1000
OTHER_CLASS = "other"
UNMATCHED_ROUTE = "unmatched"  # a request no route took (a 404 or 405): its path is not a label value
# Batch-inference error lines by reason: the first rule whose words start the error text (data._reason and
# images.ImageError write these), else "other".
INFER_REASONS = (
    ("file not found", "file_not_found"),
    ("cannot read file", "unreadable"),
    ("empty image", "empty"),
    ("image path", "path_escape"),
    ("not a supported image format", "unsupported_format"),
)


@dataclass(frozen=True)
class Spec:
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS: dict[str, Spec] = {
    # The endpoint (serve/api.py, serve/deployments.py)
    "rayimgcls_serve_requests_total": Spec("counter", "HTTP requests by route and status", ("route", "status")),
    "rayimgcls_serve_errors_total": Spec("counter", "Error responses by the README's error code", ("code",)),
    "rayimgcls_serve_images_per_request": Spec("histogram", "Images in a request that decoded", (), SIZE_BUCKETS),
    "rayimgcls_serve_decode_seconds": Spec("histogram", "Decoding a request's images", (), LATENCY_BUCKETS),
    "rayimgcls_serve_queue_model_seconds": Spec(
        "histogram", "A request's model calls, queue wait in the batcher included", (), LATENCY_BUCKETS
    ),
    "rayimgcls_serve_model_seconds": Spec("histogram", "One batched model call", (), LATENCY_BUCKETS),
    "rayimgcls_serve_batch_size": Spec("histogram", "Images per batched model call", (), SIZE_BUCKETS),
    "rayimgcls_serve_predictions_total": Spec(
        "counter", "Served images by top-1 class index and model version", ("version", "class")
    ),
    "rayimgcls_serve_confidence": Spec(
        "histogram", "Top-1 probability of served images by model version", ("version",), CONFIDENCE_BUCKETS
    ),
    # Batch inference (infer.py)
    "rayimgcls_infer_rows_total": Spec("counter", "Input rows done (a prediction or an error line)", ("run",)),
    "rayimgcls_infer_rows_per_second": Spec("gauge", "Rows done per second since the pipeline started", ("run",)),
    "rayimgcls_infer_errors_total": Spec("counter", "Error lines by reason", ("run", "reason")),
    "rayimgcls_infer_shards_total": Spec("counter", "Shards written", ("run",)),
    # Training (train_worker.py, rank 0)
    "rayimgcls_train_images_per_second": Spec("gauge", "Training images per second, all workers", ("run",)),
    "rayimgcls_train_data_wait_ratio": Spec("gauge", "Share of training time spent waiting for data", ("run",)),
    "rayimgcls_train_step_seconds": Spec("histogram", "Time per training step", ("run",), LATENCY_BUCKETS),
    "rayimgcls_train_loss": Spec("gauge", "Training loss at the last logging step", ("run",)),
    "rayimgcls_train_checkpoint_metric": Spec(
        "gauge", "The metric that ranks checkpoints, at the last checkpoint", ("run", "metric")
    ),
    "rayimgcls_train_worker_restarts_total": Spec("counter", "Worker group restarts after a failure", ("run",)),
}

_made: dict[str, Any] = {}  # name -> the ray.util.metrics object of this process


def metric(name: str) -> Any:
    """The metric `name` of METRICS, created in this process on first use."""
    if name not in _made:
        if name.startswith("rayimgcls_serve_"):
            from ray.serve import metrics  # adds the application, deployment and replica labels in a replica
        else:
            from ray.util import metrics

        spec = METRICS[name]
        if spec.kind == "histogram":
            _made[name] = metrics.Histogram(name, spec.description, list(spec.buckets), tag_keys=spec.tags)
        else:
            cls = metrics.Counter if spec.kind == "counter" else metrics.Gauge
            _made[name] = cls(name, spec.description, tag_keys=spec.tags)
    return _made[name]


def _inc(name: str, value: float = 1.0, **tags: str) -> None:
    if value > 0:  # Ray refuses a zero increment
        metric(name).inc(value, tags=tags or None)


def _observe(name: str, value: float, **tags: str) -> None:
    metric(name).observe(value, tags=tags or None)


def _set(name: str, value: float, **tags: str) -> None:
    metric(name).set(value, tags=tags or None)


def class_label(index: int) -> str:
    return str(index) if index < MAX_CLASS_LABELS else OTHER_CLASS


# ---------------------------------------------------------------------------------------------------------
# The endpoint


def serve_request(route: str | None, status: int) -> None:
    _inc("rayimgcls_serve_requests_total", route=route or UNMATCHED_ROUTE, status=str(status))


def serve_error(code: str) -> None:
    _inc("rayimgcls_serve_errors_total", code=code)


def serve_decoded(images: int, seconds: float) -> None:
    _observe("rayimgcls_serve_images_per_request", images)
    _observe("rayimgcls_serve_decode_seconds", seconds)


def serve_predicted(probs: Sequence[np.ndarray], version: str, seconds: float) -> None:
    """A request's predictions (one probability vector per image) and its queue + model seconds."""
    _observe("rayimgcls_serve_queue_model_seconds", seconds)
    for p in probs:
        top = int(np.argmax(p))
        _inc("rayimgcls_serve_predictions_total", version=version, **{"class": class_label(top)})
        _observe("rayimgcls_serve_confidence", float(p[top]), version=version)


def serve_batch(size: int, seconds: float) -> None:
    _observe("rayimgcls_serve_batch_size", size)
    _observe("rayimgcls_serve_model_seconds", seconds)


# ---------------------------------------------------------------------------------------------------------
# Batch inference


def infer_run_id(result_dir: str, input_sha256: str, model_version: str) -> str:
    """The `run` label of a batch job: the same result dir, inputs and model (a --resume) keep it."""
    return hashlib.sha256(f"{result_dir}\n{input_sha256}\n{model_version}".encode()).hexdigest()[:12]


def infer_reason(error: str) -> str:
    """A batch-inference error line's text -> a reason from a fixed set (a bounded label)."""
    text = error.lower()
    for start, reason in INFER_REASONS:
        if text.startswith(start) or f": {start}" in text:
            return reason
    if "pixels" in text:
        return "too_many_pixels"
    if "truncat" in text:
        return "truncated"
    return "undecodable" if "decode" in text else "other"


def infer_progress(run: str, rows: int, errors: Sequence[str], shards: int, rows_per_s: float) -> None:
    """One batch of lines routed by the driver: rows done, their error texts, shards it completed."""
    _inc("rayimgcls_infer_rows_total", rows, run=run)
    for error in errors:
        _inc("rayimgcls_infer_errors_total", run=run, reason=infer_reason(error))
    _inc("rayimgcls_infer_shards_total", shards, run=run)
    _set("rayimgcls_infer_rows_per_second", rows_per_s, run=run)


# ---------------------------------------------------------------------------------------------------------
# Training: called by rank 0 with the figures the loop already logs.


def train_step(run: str, *, images_per_s: float, data_wait: float, step_seconds: float, loss: float) -> None:
    """A logging step: the window's images/s and data-wait share, its mean step time, the last loss."""
    _set("rayimgcls_train_images_per_second", images_per_s, run=run)
    _set("rayimgcls_train_data_wait_ratio", data_wait, run=run)
    _observe("rayimgcls_train_step_seconds", step_seconds, run=run)
    _set("rayimgcls_train_loss", loss, run=run)


def train_checkpoint(run: str, metric_name: str, value: float) -> None:
    _set("rayimgcls_train_checkpoint_metric", value, run=run, metric=metric_name)


def train_restarted(run: str, restarts: int = 1) -> None:
    _inc("rayimgcls_train_worker_restarts_total", restarts, run=run)
