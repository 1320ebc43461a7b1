"""Where people watch a run: TensorBoard (on by default) and MLflow (when given a tracking URI).

Both show what metrics.jsonl holds: rank 0 hands every line it writes there to the trackers, which map it to
tags with `scalars()` (step lines -> train/*, epoch lines -> train/epoch_loss and val/*) on the same step axis.
A resumed run replays the lines metrics.jsonl kept (it is cut back to the checkpoint): TensorBoard rewrites its
log from them, so it never holds a step twice or out of order; MLflow, which cannot delete a point, skips the
steps the server already has (a resumed epoch repeats the interrupted one exactly).

MLflow is optional (`pip install "rayimgcls[mlflow]"`) and imported only when a tracking URI is given; the
driver checks that the server answers from the driver and from every node before Ray Train starts, creates
(or continues) the MLflow run, and logs the artifacts and the registered model after export.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from rayimgcls import storage
from rayimgcls.config import ConfigError, TrainConfig
from rayimgcls.rundir import CONFIG_FILE, CURVES_FILE, SKIPPED_FILE, SUMMARY_FILE, TENSORBOARD_DIR, RunDir

logger = logging.getLogger(__name__)

STEP_KEYS = ("loss", "lr", "images_per_s", "data_wait")
NOT_METRICS = ("type", "epoch", "step", "time")
CHECK_TIMEOUT_S = 10
FLUSH_S = 5.0  # a local event file is flushed at most this often (and at every epoch end)


def scalars(line: dict) -> dict[str, float]:
    """The tracked scalars of one metrics.jsonl line, by tag (resume lines have none)."""
    if line["type"] == "step":
        return {f"train/{k}": float(line[k]) for k in STEP_KEYS if k in line}
    if line["type"] != "epoch":
        return {}
    out = {}
    for key, value in line.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tag = {"train_loss": "train/epoch_loss", "val_loss": "val/loss"}.get(key, f"val/{key}")
        out[tag] = float(value)
    return out


def hparams(cfg: TrainConfig) -> dict[str, bool | int | float | str]:
    """The resolved configuration as flat hyperparameters (None and dicts as text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in dataclasses.asdict(cfg).items():
        out[key] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return out


# ---------------------------------------------------------------------------------------------------------
# Rank 0: the trackers of one attempt


class TensorBoardLog:
    """Event files in <run>/tensorboard/, written synchronously (tensorboardX's SummaryWriter queues events to a
    thread, and its flush() does not wait for them: an upload or a crash right after would lose the tail). On
    object storage they are written to a local folder and uploaded at every epoch end (TensorBoard reads s3://
    logdirs only through extra plugins, and an object cannot be appended to)."""

    def __init__(self, run: RunDir) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.remote = run.file(TENSORBOARD_DIR)
        for name in storage.list_files(self.remote):  # an earlier attempt's log: rewritten from metrics.jsonl
            storage.delete_file(storage.join(self.remote, name))
        self.local = tempfile.mkdtemp(prefix="rayimgcls-tb-") if storage.is_uri(self.remote) else self.remote
        os.makedirs(self.local, exist_ok=True)
        self.writer = EventsWriter(os.path.join(self.local, "events"), ".rayimgcls")
        self.last_flush = time.monotonic()

    def _write(self, summary: Any, step: int, wall_time: float | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.writer.write_event(Event(wall_time=wall_time or time.time(), step=step, summary=summary))

    def log(self, line: dict) -> None:
        from tensorboardX.summary import scalar

        for tag, value in scalars(line).items():
            self._write(scalar(tag, value), line["step"], line.get("time"))
        if self.local == self.remote and time.monotonic() - self.last_flush > FLUSH_S:
            self.flush()  # a local TensorBoard sees new steps within seconds

    def flush(self) -> None:
        self.writer.flush()
        self.last_flush = time.monotonic()
        if self.local != self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    storage.write_bytes(storage.join(self.remote, name), f.read())

    def finish(self, line: dict, cfg: TrainConfig, class_names: list[str], confusion: np.ndarray | None) -> None:
        """The confusion matrix as an image and the hyperparameters with the final metrics (the HPARAMS tab),
        in the same file as the scalars, so that the HPARAMS metrics resolve."""
        from tensorboardX.summary import hparams as hparams_summaries
        from tensorboardX.summary import image

        if confusion is not None:
            picture = confusion_image(class_names, confusion)
            self._write(image("val/confusion_matrix", picture, dataformats="HWC"), line["step"])
        for summary in hparams_summaries(hparams(cfg), scalars(line)):
            self._write(summary, line["step"])
        self.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.local != self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def confusion_image(class_names: list[str], confusion: np.ndarray) -> np.ndarray:
    from PIL import Image

    from rayimgcls.plots import confusion_png

    return np.asarray(Image.open(io.BytesIO(confusion_png(class_names, confusion))).convert("RGB"))


class MlflowLog:
    """Metrics to the MLflow run the driver opened. A tracking server that fails mid-run costs the rest of its
    metrics (said once), never the training."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id, self.broken = MlflowClient(tracking_uri), run_id, False
        # A crashed attempt may have logged past its checkpoint: those steps are on the server already.
        self.logged = {"step": 0, "epoch": 0}
        try:
            self.logged = {kind: self._last_step(tag) for kind, tag in (("step", "train/loss"), ("epoch", "val/loss"))}
            self.logged["epoch"] = max(self.logged["epoch"], self._last_step("train/epoch_loss"))
        except Exception as e:  # noqa: BLE001 - see log()
            self._stop(e)

    def _last_step(self, tag: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, tag)), default=0)

    def _stop(self, error: Exception) -> None:
        self.broken = True
        logger.warning("MLflow logging stopped (%s: %s); metrics.jsonl has every line", type(error).__name__, error)

    def log(self, line: dict) -> None:
        from mlflow.entities import Metric

        if self.broken or line["type"] not in self.logged or line["step"] <= self.logged[line["type"]]:
            return
        stamp = int(1000 * line.get("time", 0))
        metrics = [Metric(tag, value, stamp, line["step"]) for tag, value in scalars(line).items()]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # noqa: BLE001 - the server went away: keep training, say so once
            self._stop(e)

    def flush(self) -> None:
        pass

    def finish(self, *args: Any) -> None:
        pass  # artifacts and the registered model come from the driver, after export

    def close(self) -> None:
        pass


class Trackers:
    """The trackers rank 0 feeds; other ranks get an empty set."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    @classmethod
    def open(cls, cfg: TrainConfig, run: RunDir, mlflow_run_id: str | None, replay: list[dict]) -> Trackers:
        trackers: list[Any] = []
        if cfg.tensorboard:
            trackers.append(TensorBoardLog(run))
        if cfg.mlflow_tracking_uri and mlflow_run_id:
            trackers.append(MlflowLog(cfg.mlflow_tracking_uri, mlflow_run_id))
        out = cls(trackers)
        for line in replay:
            out.log(line)
        return out

    def log(self, line: dict) -> None:
        for t in self.trackers:
            t.log(line)

    def flush(self) -> None:
        for t in self.trackers:
            t.flush()

    def finish(self, line: dict, cfg: TrainConfig, class_names: list[str], confusion: np.ndarray | None) -> None:
        for t in self.trackers:
            t.finish(line, cfg, class_names, confusion)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


# ---------------------------------------------------------------------------------------------------------
# The driver: check the server, open or continue the MLflow run, log artifacts and register the model


def import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError(
            "mlflow_tracking_uri: MLflow is not installed in this Python; install the extra: "
            'pip install "rayimgcls[mlflow]" (or pip install mlflow-skinny)'
        ) from None
    return mlflow


def probe(tracking_uri: str) -> str | None:
    """Why the tracking server cannot be used from this process, or None. Runs on the driver and on each node."""
    try:
        import_mlflow()
    except ConfigError as e:
        return str(e)
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT_S) as answer:
                return None if answer.status == 200 else f"GET {url} answered {answer.status}"
        except (urllib.error.URLError, OSError) as e:
            return f"GET {url} failed: {getattr(e, 'reason', e)}"
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any backend's failure, named
        return f"{type(e).__name__}: {e}"
    return None


def check_driver(tracking_uri: str) -> None:
    problem = probe(tracking_uri)
    if problem:
        raise ConfigError(f"mlflow_tracking_uri={tracking_uri!r}: not usable from this machine: {problem}")


def check_nodes(tracking_uri: str) -> None:
    """Rank 0 logs from whichever node it lands on: every node must reach the server (127.0.0.1 is each node's
    own loopback). One zero-CPU task per node, so the check never waits for resources."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(probe)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = {
        n["NodeManagerAddress"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(tracking_uri)
        for n in nodes
    }
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=120), strict=True))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"mlflow_tracking_uri={tracking_uri!r}: the check on the nodes did not answer") from None
    problems = [f"node {node}: {p}" for node, p in answers.items() if p]
    if problems:
        raise ConfigError(
            f"mlflow_tracking_uri={tracking_uri!r}: not usable from the training nodes (a server on 127.0.0.1 "
            "only works on one machine):\n  " + "\n  ".join(problems)
        )


class MlflowRun:
    """The MLflow run of a training run: its id is kept in <run>/mlflow.json, so a resume continues it."""

    def __init__(self, cfg: TrainConfig, run_id: str) -> None:
        from mlflow import MlflowClient

        self.cfg, self.run_id = cfg, run_id
        self.client = MlflowClient(cfg.mlflow_tracking_uri)

    @classmethod
    def start(cls, cfg: TrainConfig, run: RunDir) -> MlflowRun:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        uri = cfg.mlflow_tracking_uri
        client = MlflowClient(uri)
        stored = run.read_mlflow()
        if stored and stored["tracking_uri"] == uri:
            client.update_run(stored["run_id"], status="RUNNING")
            out = cls(cfg, stored["run_id"])
        else:
            experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow_experiment)
            mlflow_run = client.create_run(experiment_id, run_name=cfg.run_name)
            out = cls(cfg, mlflow_run.info.run_id)
            # Params are immutable in MLflow: what a resume may change goes into tags instead.
            fixed = {k: v for k, v in hparams(cfg).items() if k not in TrainConfig.RESUMABLE_CHANGES}
            client.log_batch(out.run_id, params=[Param(k, str(v)) for k, v in fixed.items()])
            run.write_mlflow({"tracking_uri": uri, "experiment_id": experiment_id, "run_id": out.run_id})
        changeable = {k: str(v) for k, v in hparams(cfg).items() if k in TrainConfig.RESUMABLE_CHANGES}
        tags = {**changeable, "rayimgcls.run_name": str(cfg.run_name), "rayimgcls.run_dir": run.path}
        client.log_batch(out.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        print(f"MLflow run {out.run_id} in experiment {cfg.mlflow_experiment!r} at {uri}", flush=True)
        return out

    def finish(self, run: RunDir, model_dir: str, model_version: str) -> None:
        """Artifacts (config, curves, summary, skipped rows, the model directory), tags, the registered model."""
        with tempfile.TemporaryDirectory(prefix="rayimgcls-mlflow-") as tmp:
            for name in (CONFIG_FILE, CURVES_FILE, SUMMARY_FILE, SKIPPED_FILE):
                if storage.exists(run.file(name)):
                    self.client.log_artifact(self.run_id, _local(run.file(name), os.path.join(tmp, name)))
            model = model_dir
            if storage.is_uri(model_dir):
                model = os.path.join(tmp, "model")
                for rel in storage.walk_files(model_dir):
                    _local(storage.join(model_dir, rel), os.path.join(model, rel))
            self.client.log_artifacts(self.run_id, model, "model")
        self.client.set_tag(self.run_id, "rayimgcls.model_version", model_version)
        if self.cfg.register_model:
            self.register(model_version)
        self.client.set_terminated(self.run_id, "FINISHED")

    def register(self, model_version: str) -> None:
        from mlflow.exceptions import MlflowException

        name = self.cfg.register_model
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(
            name, source, run_id=self.run_id, tags={"rayimgcls.model_version": model_version}
        )
        self.client.set_tag(self.run_id, "rayimgcls.registered_model", f"{name}/{version.version}")
        print(f"registered model {name!r} version {version.version} in MLflow", flush=True)

    def failed(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - the training error matters more than this one
            logger.warning("could not mark MLflow run %s failed: %s", self.run_id, e)


def _local(path: str, tmp_path: str) -> str:
    """A local path to log as an artifact: the file itself when local, else a copy in tmp_path."""
    if not storage.is_uri(path):
        return path
    os.makedirs(os.path.dirname(tmp_path), exist_ok=True)
    with open(tmp_path, "wb") as f:
        f.write(storage.read_bytes(path))
    return tmp_path
