"""The training driver: what `rayimgcls train` and `python -m rayimgcls.train` run.

It checks everything it can before starting Ray (configuration, model name, the CSV, resuming, the tracking
server), refuses resources the cluster can never give, starts a TorchTrainer whose workers run
`loop.train_loop`, and finally exports the best checkpoint as a model directory (export.py). A run lives in
<storage_path>/<run_name>/ (see rayimgcls.rundir); re-running with the same name resumes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import torch

from rayimgcls import console, storage
from rayimgcls.card import ModelError, read_card
from rayimgcls.config import ConfigError, TrainConfig, diff, float_triple
from rayimgcls.dataset import LABELS_CSV
from rayimgcls.images import Augment, PreprocessConfig
from rayimgcls.model import check_model_name, create_model, load_weights
from rayimgcls.rundir import RunDir, data_fingerprint
from rayimgcls.runtime import ResourceError, check_resources, init_ray, max_is_known, max_resources, node_cpus
from rayimgcls.text import printable
from rayimgcls.train import tracking
from rayimgcls.train.class_weights import class_weights, weights_file
from rayimgcls.train.data import PreparedData, prepare_data, record_skipped
from rayimgcls.train.export import finish, reexport
from rayimgcls.train.loop import LoopContext, train_loop

CACHE_VALIDATION_BYTES = 1 << 30  # decoded validation subsets up to 1 GiB stay in the object store


class TrainingError(RuntimeError):
    """Training failed for a reason the user can read (a bad row, a worker error)."""


def default_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def check_resume(cfg: TrainConfig) -> str:
    """'new', 'resume' or 'complete'. A run name that exists with other settings or other data is refused,
    showing the differences (num_epochs may grow, and where the model goes and how it is tracked may change).
    cfg holds the preprocessing resolved from the model (store_preprocess)."""
    run = RunDir.of(cfg)
    if not run.exists():
        return "new"
    stored = stored_config(run, cfg)
    changes = diff(stored, cfg, ignore=TrainConfig.RESUMABLE_CHANGES)
    if changes:
        raise ConfigError(
            f"run {cfg.run_name!r} exists in {cfg.storage_path} with other settings; use a new "
            "--run-name, or the same settings to resume. Differences:\n  " + "\n  ".join(changes)
        )
    run.check_fingerprint(data_fingerprint(cfg.data_root, cfg.pretrained, weights_file(cfg)))
    done = run.completed_epochs()
    if cfg.num_epochs < done:
        raise ConfigError(
            f"num_epochs={cfg.num_epochs}: run {cfg.run_name!r} has completed {done} epochs already; give "
            f"--num-epochs {done} (exports the finished run again) or more (trains on), or a new --run-name"
        )
    summary = run.read_summary()
    if summary and summary.get("completed") and summary.get("stopped_early"):
        # a run that stopped early is finished, whatever num_epochs or the patience say now
        patience, min_delta = stored.get("early_stopping_patience"), stored.get("early_stopping_min_delta", 0.0)
        if (patience, min_delta) != (cfg.early_stopping_patience, cfg.early_stopping_min_delta):
            stopped = summary.get("final", {}).get("epoch", summary.get("epochs"))
            print(
                f"run {cfg.run_name} stopped early at epoch {stopped} (early_stopping_patience={patience}); "
                "another patience does not train it on: use a new --run-name to train longer",
                flush=True,
            )
        return "complete"
    if summary and summary.get("completed") and summary.get("epochs") == cfg.num_epochs:
        return "complete"
    return "resume"


def stored_config(run: RunDir, cfg: TrainConfig) -> dict:
    """config.yaml of the run as a new run would write it: runs from before store_preprocess have null for the
    timm model's own preprocessing (what cfg holds now), and older ones the mean/std as a string."""
    old = run.read_config()
    for name in PREPROCESS_FIELDS:
        if old.get(name) is None:
            old[name] = getattr(cfg, name)
        elif name in ("mean", "std"):
            old[name] = float_triple(old[name]) or old[name]
    return old


def worker_cpus(cfg: TrainConfig) -> float:
    """CPUs each worker reserves: as given, 1 with a GPU, else the cluster's CPUs less one for Ray Data
    (a trainer holding every CPU starves the decode tasks and hangs), capped by the largest node."""
    if cfg.cpus_per_worker is not None:
        return cfg.cpus_per_worker
    if cfg.use_gpu:
        return 1.0

    total = max_resources().get("CPU", 0.0)
    largest_node = max(node_cpus(), default=total)
    return max(0.25, min((total - 1) / cfg.num_workers, largest_node))


def check_cluster(cfg: TrainConfig, cpus: float) -> None:
    total = max_resources().get("CPU", 0.0)
    check_resources(
        f"training with {cfg.num_workers} worker(s)",
        cpus=cfg.num_workers * cpus,
        gpus=cfg.num_workers if cfg.use_gpu else 0,
    )
    if cfg.num_workers * cpus > total - 0.5 and max_is_known():
        raise ResourceError(
            f"{cfg.num_workers} worker(s) x {cpus:g} CPU = {cfg.num_workers * cpus:g} of the "
            f"cluster's {total:g} CPUs leaves Ray Data none to decode images (the run would hang); "
            "lower --cpus-per-worker or --num-workers"
        )


def resolve_model(cfg: TrainConfig, num_classes: int) -> tuple[dict, PreprocessConfig]:
    """The exact timm kwargs and the preprocessing of the model (built on the meta device: no memory)."""
    check_model_name(cfg.model)
    with torch.device("meta"):
        model, kwargs = create_model(
            cfg.model,
            num_classes,
            cfg.image_size,
            dropout_rate=cfg.dropout_rate,
            attention_dropout_rate=cfg.attention_dropout_rate,
            model_kwargs=cfg.model_kwargs,
        )
    return kwargs, preprocess_of(cfg, PreprocessConfig.from_model(model, cfg.image_size))


def preprocess_of(cfg: TrainConfig, model_default: PreprocessConfig) -> PreprocessConfig:
    """The timm model's preprocessing with the --crop-pct/--crop-mode/--interpolation/--mean/--std given."""
    given = {k: getattr(cfg, k) for k in PREPROCESS_FIELDS if getattr(cfg, k) is not None}
    for name in ("mean", "std"):
        if name in given:
            given[name] = tuple(given[name])
    return dataclasses.replace(model_default, **given)


PREPROCESS_FIELDS = ("crop_pct", "crop_mode", "interpolation", "mean", "std")


def store_preprocess(cfg: TrainConfig, pre: PreprocessConfig) -> None:
    """Write the preprocessing resolved from the timm model into cfg, so config.yaml shows what the run used."""
    for name in PREPROCESS_FIELDS:
        value = getattr(pre, name)
        setattr(cfg, name, list(value) if isinstance(value, tuple) else value)


def augment_of(cfg: TrainConfig) -> Augment:
    """The train transform's switches (the preset already resolved into cfg)."""
    return Augment(cfg.random_resized_crop, cfg.crop_scale_min, cfg.hflip, cfg.vflip, cfg.color_jitter, cfg.randaugment)


def pretrained_state(cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """Weights to fine-tune from: a local file, or a timm hub name when the hub is reachable."""
    if not cfg.pretrained:
        return None
    if storage.exists(cfg.pretrained) or "/" in cfg.pretrained or cfg.pretrained.endswith((".safetensors", ".pth")):
        return load_weights(cfg.pretrained)
    import timm

    try:
        return timm.create_model(cfg.pretrained, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 - no hub, unknown name, no network: say which
        raise ModelError(
            f"pretrained={cfg.pretrained!r}: not a local file, and loading it from the hub failed "
            f"({type(e).__name__}: {e})"
        ) from None


def build_trainer(
    cfg: TrainConfig,
    data: PreparedData,
    model_kwargs: dict,
    pre: PreprocessConfig,
    cpus: float,
    weights: list[float] | None = None,
    mlflow_run_id: str | None = None,
    progress: Any = None,
):
    import ray
    from ray.data import DataContext
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayimgcls.data import DecodeSpec, image_dataset

    DataContext.get_current().enable_progress_bars = False  # travels with the datasets to the workers
    spec = DecodeSpec(cfg.data_root, LABELS_CSV, pre, augment_of(cfg), data.classes.num_classes, cfg.multilabel)
    # Rows permuted once (seeded) so that every block mixes the classes: CSVs often list them one after another
    # (from-folders does), and per-epoch shuffling below only reorders blocks and mixes a few batches' rows.
    rows = data.train.sample(frac=1.0, random_state=cfg.seed)
    datasets = {"train": image_dataset(rows, spec, shuffle_blocks=True).select_columns(["image", "label"])}
    if len(data.validation):
        eval_spec = dataclasses.replace(spec, augment=None)
        validation = image_dataset(data.validation, eval_spec).select_columns(["image", "label"])
        if len(data.validation) * 3 * pre.input_size**2 <= CACHE_VALIDATION_BYTES:
            validation = validation.materialize()  # deterministic: decode once, not every epoch
        datasets["validation"] = validation
    state = pretrained_state(cfg)
    ctx = LoopContext(
        cfg=dataclasses.asdict(cfg),
        num_classes=data.classes.num_classes,
        class_names=data.classes.names,
        preprocess=pre.to_dict(),
        model_kwargs=model_kwargs,
        steps_per_epoch=steps_per_epoch(cfg, len(data.train)),
        run_dir=RunDir.of(cfg).path,
        has_validation=bool(len(data.validation)),
        pretrained_state=ray.put(state) if state is not None else None,
        mlflow_run_id=mlflow_run_id,
        progress=progress,
        class_weights=weights,
    )
    metric = cfg.metric if len(data.validation) else None
    storage_path, storage_filesystem = storage.train_storage(cfg.storage_path)
    return TorchTrainer(
        train_loop,
        train_loop_config={"ctx": ctx, "torch_threads": cfg.torch_threads or max(1, int(cpus))},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            logging_config=LoggingConfig(log_level="WARNING"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order="min" if metric == "val_loss" else "max",
            ),
        ),
        datasets=datasets,
        # Only train is split: rank 0 scores the whole validation subset, so every row counts once.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def steps_per_epoch(cfg: TrainConfig, train_rows: int) -> int:
    """Optimizer steps per epoch: Ray Train gives each worker an equal share of the rows and we drop the
    last partial batch, so this is exact (OneCycleLR needs the real total)."""
    per_worker = cfg.batch_size // cfg.num_workers
    steps = (train_rows // cfg.num_workers) // per_worker
    if steps == 0:
        raise ConfigError(
            f"batch_size={cfg.batch_size}: the train subset has {train_rows} rows, fewer than "
            f"one batch of {per_worker} per worker ({cfg.num_workers} workers)"
        )
    return steps


def failure_message(error: BaseException) -> str:
    """The line a user needs out of a worker's traceback (a bad row names its CSV line)."""
    text = "\n".join(str(e) for e in _error_chain(error))
    found = re.findall(r"BadRowError: (.+)", text)
    if found:
        return found[-1]
    lines = [x for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^\w+(Error|Exception)\b", x.strip())]
    return (errors[-1] if errors else lines[-1] if lines else repr(error)).strip()


def _error_chain(error: BaseException | None) -> list[BaseException]:
    """The error, its causes, and the per-worker errors Ray Train collects (its own message truncates them)."""
    out: list[BaseException] = []
    while error is not None and error not in out:
        out.append(error)
        for failure in (getattr(error, "worker_failures", None) or {}).values():
            out += _error_chain(failure)
        error = error.__cause__
    return out


def run(cfg: TrainConfig, address: str | None = None) -> dict:
    """Train (or resume, or re-export a finished run) and return the summary."""
    if cfg.run_name is None:
        cfg.run_name = default_run_name()
        print(f"run name: {cfg.run_name} (re-run with --run-name {cfg.run_name} to resume)", flush=True)
    data = prepare_data(cfg)
    weights = class_weights(cfg, data.classes.names, data.train)  # a bad file fails here, before Ray starts
    if weights is not None:
        shown = ", ".join(f"{printable(n)} {w:.3g}" for n, w in zip(data.classes.names, weights, strict=True))
        print(f"class weights: {shown}", flush=True)
    if cfg.early_stopping_patience and not len(data.validation):
        raise ConfigError("early_stopping_patience: needs rows with subset 'validation' (it watches their metric)")
    model_kwargs, pre = resolve_model(cfg, data.classes.num_classes)
    store_preprocess(cfg, pre)  # config.yaml shows the preprocessing the run uses, not null for "the model's"
    state = check_resume(cfg)
    if state == "complete":
        return reexport(cfg, data, model_kwargs, pre)
    if cfg.mlflow_tracking_uri:  # seconds now, rather than an exception after the first epoch
        tracking.check_driver(cfg.mlflow_tracking_uri)
    init_ray(address)
    cpus = worker_cpus(cfg)
    check_cluster(cfg, cpus)
    if cfg.mlflow_tracking_uri:
        tracking.check_nodes(cfg.mlflow_tracking_uri)
    run_dir = RunDir.of(cfg)
    if state == "new":
        run_dir.write_config(cfg)
        run_dir.write_fingerprint(data_fingerprint(cfg.data_root, cfg.pretrained, weights_file(cfg)))
    if cfg.skip_bad_rows:
        record_skipped(cfg, data)
    if state == "resume":
        print(f"resuming run {cfg.run_name} from {run_dir.path}", flush=True)
    mlflow_run = tracking.MlflowRun.start(cfg, run_dir) if cfg.mlflow_tracking_uri else None
    with console.ray_log(run_dir.path):
        summary = fit(cfg, data, model_kwargs, pre, cpus, weights, mlflow_run)
    if mlflow_run:
        mlflow_run.finish(run_dir, summary["model_dir"], read_card(summary["model_dir"]).version)
    return summary


def fit(
    cfg: TrainConfig,
    data: PreparedData,
    model_kwargs: dict,
    pre: PreprocessConfig,
    cpus: float,
    weights: list[float] | None,
    mlflow_run: tracking.MlflowRun | None,
) -> dict:
    """Run the TorchTrainer with the console's progress, then export the best checkpoint; the summary."""
    box = console.mailbox()
    run_id = mlflow_run.run_id if mlflow_run else None
    trainer = build_trainer(cfg, data, model_kwargs, pre, cpus, weights, run_id, box)
    started = time.time()
    try:
        with console.train_progress(box, cfg.num_epochs, steps_per_epoch(cfg, len(data.train))):
            result = trainer.fit()
        if result.error is not None:
            raise TrainingError(f"training failed: {failure_message(result.error)}")
    except Exception as e:
        if mlflow_run:
            mlflow_run.failed()
        if isinstance(e, TrainingError):
            raise
        raise TrainingError(f"training failed: {failure_message(e)}") from e  # Ray wraps worker errors
    return finish(cfg, data, model_kwargs, pre, started, result)
