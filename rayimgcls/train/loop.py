"""The Ray Train worker loop: one copy runs in each training worker.

Resume is exact by construction: a checkpoint holds the model (and its EMA), optimizer and LR-scheduler state, the
completed epoch and the global step; every epoch draws its random numbers from a seed derived from
(seed, epoch, rank), so a resumed epoch starts from the same RNG state as the uninterrupted run would, and
metrics.jsonl (and the trackers fed from it) is cut back to the checkpoint's step before it grows again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayimgcls import storage, telemetry
from rayimgcls.config import TrainConfig
from rayimgcls.console import WorkerProgress
from rayimgcls.images import PreprocessConfig, normalize
from rayimgcls.model import create_model, resolve_precision, use_ieee_fp32
from rayimgcls.report import training as training_report
from rayimgcls.rundir import (
    WORKERS_FILE,
    MetricsLog,
    RunDir,
    checkpoint_dir_name,
    load_checkpoint_weights,
    load_train_state,
    save_checkpoint,
)
from rayimgcls.train.ema import build_ema
from rayimgcls.train.tracking import Trackers
from rayimgcls.train.validation import label_dtype, score

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopContext:
    """What the driver resolved and every worker needs (travels as train_loop_config)."""

    cfg: dict
    num_classes: int
    class_names: list[str]
    preprocess: dict
    model_kwargs: dict
    steps_per_epoch: int
    run_dir: str
    has_validation: bool
    pretrained_state: Any = None  # an ObjectRef to the transfer weights, when fine-tuning
    mlflow_run_id: str | None = None  # the MLflow run the driver opened, when tracking there
    progress: Any = None  # the driver's console.mailbox(): rank 0's progress goes there
    class_weights: list[float] | None = None  # per class (CE weight, BCE pos_weight), from --class-weights


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (2**31)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW + OneCycleLR whose peak is learning_rate, over the real number of optimizer steps. With
    layer_decay, timm's layer groups (no weight decay on biases and norms) each peak at learning_rate x their
    lr_scale: OneCycleLR sets every group's lr itself, so the scales go in as its per-group max_lr."""
    if cfg.layer_decay is None:
        groups: list[dict] = [{"params": list(model.parameters())}]
        peaks = [cfg.learning_rate]
    else:
        from timm.optim import param_groups_layer_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_layer_decay(
            model, weight_decay=cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
        peaks = [cfg.learning_rate * g.get("lr_scale", 1.0) for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps)
    return optimizer, scheduler


def restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.OneCycleLR,
    ema: torch.nn.Module | None = None,
) -> tuple[int, int]:
    """Load the latest checkpoint if Ray Train has one (the EMA too, on rank 0 with --model-ema); return
    (epochs done, global step)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_checkpoint_weights(d))
        if ema is not None:
            ema.module.load_state_dict(load_checkpoint_weights(d, "ema"))
        state = load_train_state(d)
    optimizer.load_state_dict(state["optimizer"])
    if state["scheduler"]["total_steps"] == scheduler.total_steps:
        scheduler.load_state_dict(state["scheduler"])
    else:  # num_epochs changed: same schedule shape over the new length, fast-forwarded
        for _ in range(state["global_step"]):
            scheduler.step()
    return state["epoch"], state["global_step"]


def current_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The learning rate the next step uses: the largest group's (with --layer-decay the head's, at
    learning_rate on the schedule; the lower blocks run at fractions of it)."""
    return max(scheduler.get_last_lr())


def load_transfer_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load backbone weights for fine-tuning: the model's own checkpoint filter (e.g. ViT position-embedding
    resampling) runs first, and tensors whose shape differs (a classifier for another class count) are left
    at their fresh initialisation. Returns the names of the tensors that were not loaded."""
    import importlib

    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # noqa: BLE001 - a filter that does not apply: load the state as it is
            logger.info("checkpoint_filter_fn of %s did not apply (%s)", type(model).__name__, e)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # strict=False because the skipped tensors are missing on purpose; unexpected keys were filtered above
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for 'bf16', and for 'auto' on GPUs with native bf16 (model.resolve_precision: not a V100 or
    T4, where bf16 is emulated); fp32 on CPUs for 'auto' (CPU bf16 training speed varies too much between models
    and chips to assume)."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def timed(it: Iterator) -> Iterator[tuple[float, Any]]:
    """Yield (seconds spent waiting for the item, item)."""
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - start, item


def train_loop(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx: LoopContext = config["ctx"]
    cfg = TrainConfig(**ctx.cfg)
    pre = PreprocessConfig.from_dict(ctx.preprocess)
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    if device.type == "cuda" and cfg.precision == "fp32":
        use_ieee_fp32()  # 'fp32' means fp32 on a GPU too: no TF32 matmuls or convolutions
    _record_worker(ctx.run_dir, cfg.run_name or "", rank, world)

    seed_everything(cfg.seed)  # identical initial weights on every worker
    model, _ = create_model(cfg.model, ctx.num_classes, model_kwargs=ctx.model_kwargs)
    if ctx.pretrained_state is not None:
        state = ctx.pretrained_state
        state = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        fresh = load_transfer_weights(model, state)
        if rank == 0 and fresh:
            note = f"fine-tuning from {cfg.pretrained}: freshly initialised {', '.join(fresh)}"
            WorkerProgress(ctx.progress, ctx.steps_per_epoch, cfg.num_epochs).note(note)
    # On the device before the optimizer exists: a restored optimizer state follows its parameters' device, and
    # prepare_model below moves only the parameters (a resumed GPU run would meet CPU moments in its first step).
    model.to(device)
    ema = build_ema(model, cfg) if rank == 0 else None  # before compiling: the average runs eagerly
    optimizer, scheduler = build_optimizer(model, cfg, cfg.num_epochs * ctx.steps_per_epoch)
    start_epoch, global_step = restore(model, optimizer, scheduler, ema)
    module = model  # the plain module: what is averaged, scored and checkpointed
    if cfg.torch_compile:
        # In place, and before the DDP wrapper (PyTorch's advice): the state dict keeps its keys (no `_orig_mod.`)
        module.compile()
    model = ray.train.torch.prepare_model(module)
    log = Journal(ctx, cfg, global_step) if rank == 0 else None
    if log is not None and start_epoch:
        log.progress.note(f"resumed from epoch {start_epoch} (step {global_step}, lr {current_lr(scheduler):.3g})")
        log.add(type="resume", epoch=start_epoch, step=global_step, lr=current_lr(scheduler))

    loss_fn, mixup = _loss_and_mixup(cfg, ctx.num_classes, ctx.class_weights)
    loss_fn = loss_fn.to(device)  # the class weights, if any
    amp = autocast_dtype(cfg.precision, device)
    batch_size = cfg.batch_size // world // cfg.grad_accum_steps  # a micro-batch
    for epoch in range(start_epoch, cfg.num_epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, rank))
        model.train()
        epoch_loss, steps, window = 0.0, 0, _Window()
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            device=device,
            # Small on purpose: the first batch of each epoch waits until the buffer holds this many decoded rows
            # (a 256-row buffer was most of the 5% data wait measured by benchmarks/bench_train.py); the rows
            # are permuted on the driver and the block order changes every epoch.
            local_shuffle_buffer_size=2 * batch_size,
            dtypes={"image": torch.uint8, "label": label_dtype(cfg)},
            pin_memory=device.type == "cuda",  # pinned pages make Ray's copy to the GPU asynchronous
        )
        optimizer.zero_grad(set_to_none=True)  # a shard that ended mid-accumulation leaves nothing behind
        micro, loss_sum, step_images, step_wait = 0, 0.0, 0, 0.0
        compiling = cfg.torch_compile and log is not None and epoch == start_epoch  # the first call compiles
        for wait, batch in timed(iter(batches)):
            if steps == ctx.steps_per_epoch:
                break  # equal shards make this rare; never step the schedule past its end
            x = normalize(batch["image"], pre)
            y = batch["label"]
            if mixup is not None:
                x, y = mixup(x, y)
            micro += 1
            last = micro % cfg.grad_accum_steps == 0
            started = time.perf_counter()
            loss_sum += backward(model, x, y, loss_fn, amp, cfg.grad_accum_steps, sync=last)
            if compiling:
                log.compiled(epoch + 1, global_step, time.perf_counter() - started)
                compiling = False
            window.add(len(x) * world, wait)
            step_images, step_wait = step_images + len(x) * world, step_wait + wait
            if not last:
                continue
            check_finite("training loss", loss_sum, epoch + 1, global_step + 1)  # before NaN reaches the weights
            clip_gradients(model, cfg)
            lr = current_lr(scheduler)  # the rate this step uses (after the last step the schedule is past its end)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss, loss_sum = torch.tensor(loss_sum), 0.0
            global_step, steps = global_step + 1, steps + 1
            if ema is not None:
                ema.update(module, step=global_step)  # timm's decay warm-up counts optimizer steps
            epoch_loss += loss.item()
            if log is not None:
                log.progress.step(epoch + 1, steps, global_step, epoch_loss / steps, lr, step_images, step_wait)
            step_images, step_wait = 0, 0.0
            if log is not None and global_step % cfg.logging_steps == 0:
                rate, wait_frac = window.flush()
                log.add(
                    type="step",
                    epoch=epoch + 1,
                    step=global_step,
                    loss=round(loss.item(), 6),
                    lr=lr,
                    images_per_s=round(rate, 1),
                    data_wait=round(wait_frac, 4),
                )
        metrics, confusion = {"epoch": epoch + 1, "step": global_step, "train_loss": epoch_loss / max(steps, 1)}, None
        if rank == 0:
            scores, confusion = score(module, ema, pre, cfg, ctx.num_classes, ctx.has_validation, device, amp)
            metrics.update(scores)
            for name in ("val_loss", "raw_val_loss", "ema_val_loss"):
                check_finite(name.replace("_", " "), metrics.get(name, 0.0), epoch + 1, global_step)
        stop = agree(log is not None and should_stop(cfg, [*log.epochs(), metrics]), world, device)
        _report(ctx, module, ema, optimizer, scheduler, metrics, rank, log)
        if log is not None and stop:
            log.progress.note(
                f"early stopping after epoch {epoch + 1}: {cfg.metric} has not improved"
                f" for {cfg.early_stopping_patience} epoch(s)"
            )
            log.add(type="early_stop", epoch=epoch + 1, step=global_step)
        if log is not None and (stop or epoch + 1 == cfg.num_epochs):
            log.finish(cfg, ctx.class_names, confusion)
        if stop:
            break
    if log is not None:
        log.close()


def backward(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Any,
    amp: torch.dtype | None,
    accum_steps: int,
    sync: bool,
) -> float:
    """Add one micro-batch's gradients (the loss scaled by 1/accum_steps, so N micro-batches of B/N sum to the
    gradient of one batch of B). DDP all-reduces only when `sync` (the last micro-step): the others
    accumulate locally under no_sync. Returns the micro-batch's share of the step's loss."""
    with contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(x).float(), y) / accum_steps
        loss.backward()
    return loss.item()


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training diverged, and every later step (and checkpoint) would be NaN."""


def check_finite(name: str, loss: float, epoch: int, step: int) -> None:
    """Fail the run, naming where, when a loss is not finite (a NaN run would otherwise 'succeed': NaN compares
    false with every metric, and the export would hold NaN weights). Raised in the worker, it reaches the user
    through Ray as the TrainingError's message; no model is exported."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the {name} is {loss} at epoch {epoch}, optimizer step {step}: training diverged (all-zero or"
            " overflowing --class-weights, a learning rate too high, or NaN inputs); no model was exported"
        )


def clip_gradients(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """--clip-grad: the total L2 norm (timm's default 'norm') or each element ('value') at most clip_grad."""
    if cfg.clip_grad is None:
        return
    if cfg.clip_mode == "norm":
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    else:
        torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_grad)


def should_stop(cfg: TrainConfig, epochs: list[dict]) -> bool:
    """Early stopping on the checkpoint metric, as Keras' EarlyStopping: an epoch improves only when it is
    strictly better than the best so far by more than `early_stopping_min_delta` (a tie, a flat metric, is no
    improvement), and training stops once `early_stopping_patience` epochs in a row did not. Read from the epoch
    lines, so a resumed run counts on."""
    patience, metric = cfg.early_stopping_patience, cfg.metric
    values = [e[metric] for e in epochs if metric in e]
    if patience is None or not values:
        return False
    sign = -1 if metric == "val_loss" else 1
    best, waited = sign * values[0], 0
    for v in values[1:]:
        if sign * v - cfg.early_stopping_min_delta > best:
            best, waited = sign * v, 0
        else:
            waited += 1
    return waited >= patience


def agree(decision: bool, world: int, device: torch.device) -> bool:
    """Rank 0's decision on every worker (a worker that stopped alone would hang the others at the next report)."""
    if world == 1:
        return decision
    flag = torch.tensor([int(decision)], device=device)  # NCCL broadcasts only CUDA tensors
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


class Journal:
    """What rank 0 records: metrics.jsonl, and the trackers (TensorBoard, MLflow) and Prometheus (telemetry) fed
    the same lines. On resume both continue from the lines metrics.jsonl kept (cut back to the checkpoint's step)."""

    def __init__(self, ctx: LoopContext, cfg: TrainConfig, resume_step: int) -> None:
        self.run_dir, self.run_name, self.metric, self.batch = (
            ctx.run_dir,
            cfg.run_name or "",
            cfg.metric,
            cfg.batch_size,
        )
        run = RunDir(ctx.run_dir)
        self.metrics = MetricsLog(run, resume_step)
        self.trackers = Trackers.open(cfg, run, ctx.mlflow_run_id, self.metrics.kept)
        self.progress = WorkerProgress(ctx.progress, ctx.steps_per_epoch, cfg.num_epochs)
        if not resume_step:  # where the first epoch's time starts (a resume logs its own line)
            self.metrics.add(type="start", epoch=0, step=0)

    def add(self, **record: Any) -> None:
        self.trackers.log(self.metrics.add(**record))
        if record["type"] == "step":
            step_s = self.batch / max(record["images_per_s"], 1e-9)  # a global batch per optimizer step
            telemetry.train_step(
                self.run_name,
                images_per_s=record["images_per_s"],
                data_wait=record["data_wait"],
                step_seconds=step_s,
                loss=record["loss"],
            )
        elif record["type"] == "epoch" and self.metric in record:
            telemetry.train_checkpoint(self.run_name, self.metric, float(record[self.metric]))

    def compiled(self, epoch: int, step: int, seconds: float) -> None:
        """--torch-compile: what the first call (which compiled the model) took, and the graphs Dynamo made."""
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
        self.progress.note(f"torch.compile: the first step took {seconds:.1f} s (compiling {graphs} graph(s))")
        self.add(type="compile", epoch=epoch, step=step, seconds=round(seconds, 2), graphs=graphs)

    def epochs(self) -> list[dict]:
        return [x for x in self.metrics.lines if x["type"] == "epoch"]

    def epoch_done(self) -> None:
        self.trackers.flush()
        training_report.update(self.run_dir)  # report.html, to open during the run

    def finish(self, cfg: TrainConfig, class_names: list[str], confusion: np.ndarray | None) -> None:
        self.trackers.finish(self.metrics.lines[-1], cfg, class_names, confusion)

    def close(self) -> None:
        self.trackers.close()


class _Window:
    """Images and data-wait time since the last log line."""

    def __init__(self) -> None:
        self.start, self.images, self.wait = time.perf_counter(), 0, 0.0

    def add(self, images: int, wait: float) -> None:
        self.images += images
        self.wait += wait

    def flush(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = (self.images / elapsed, self.wait / elapsed)
        self.__init__()
        return out


def _loss_and_mixup(cfg: TrainConfig, num_classes: int, weights: list[float] | None = None) -> tuple[Any, Any]:
    """Cross-entropy (label smoothing and class weights, or soft targets under MixUp/CutMix) or BCE-with-logits
    (class weights as pos_weight)."""
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    if cfg.multilabel:
        return torch.nn.BCEWithLogitsLoss(pos_weight=w), None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
        )
        return SoftTargetCrossEntropy(), mixup
    return torch.nn.CrossEntropyLoss(weight=w, label_smoothing=cfg.label_smoothing), None


def _report(
    ctx: LoopContext,
    module: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.OneCycleLR,
    metrics: dict,
    rank: int,
    log: Journal | None,
) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint and logs the epoch."""
    import ray.train

    epoch = metrics["epoch"]
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_dir_name(epoch))
        return
    assert log is not None
    log.add(type="epoch", **metrics)
    log.progress.epoch(metrics)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(
            d, module, optimizer, scheduler, epoch, metrics["step"], metrics, ema.module if ema is not None else None
        )
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=checkpoint_dir_name(epoch)
        )
    log.epoch_done()


def _record_worker(run_dir: str, run_name: str, rank: int, world: int) -> None:
    """workers.json: rank -> node, host, pid, device of this attempt (for debugging and cluster tests). A file left
    by an earlier attempt of the same job means Ray Train restarted the worker group (a resume is a new job)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    info = {
        "job_id": job,
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    gathered: list[Any] = [info]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, info)
    if rank == 0:
        runs = RunDir(run_dir)
        if storage.exists(runs.file(WORKERS_FILE)) and runs.read_workers()[0].get("job_id") == job:
            telemetry.train_restarted(run_name)
        runs.write_workers(gathered)
