"""Training speed: the Ray Train loop against a plain PyTorch loop, and how long steps wait for Ray Data.

1. Loop overhead. The same model, batch and in-memory uint8 data, the same explicit torch thread count on
   both sides (Ray would otherwise set OMP_NUM_THREADS from the worker's CPU reservation):
   - plain: a single-process loop (normalise, forward, backward, AdamW, OneCycleLR), timed after warm-up;
   - Ray Train: rayimgcls's own worker loop (`train.loop.train_loop`) in one TorchTrainer worker, fed the
     same arrays as a materialised Ray Dataset; its images/s comes from metrics.jsonl, first epoch excluded.
     TensorBoard is on, as by default.
   - the same Ray Train loop with --no-tensorboard: what tracking costs, as the extra share of step time
     (images/s without / images/s with - 1).
2. Data wait. A real `rayimgcls train` run reading JPEGs through the Ray Data decode pipeline: the share of
   step time spent waiting for the next batch (metrics.jsonl `data_wait`), first epoch excluded.

All are the median of --runs runs, interleaved. The defaults take ~14 minutes on 2 cores.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --runs 1 --steps 10     # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rayimgcls.config import TrainConfig
from rayimgcls.images import PreprocessConfig, normalize
from rayimgcls.model import create_model
from rayimgcls.rundir import RunDir
from rayimgcls.train.loop import LoopContext, build_optimizer, train_loop


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=24, help="timed steps per plain run; Ray runs the same per epoch")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/rayimgcls-bench-train")
    return p.parse_args()


def config(args: argparse.Namespace, root: str, storage: str, name: str, epochs: int) -> TrainConfig:
    return TrainConfig(
        data_root=root,
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_epochs=epochs,
        logging_steps=4,
        learning_rate=1e-4,
        precision="fp32",
        torch_threads=args.threads,
        cpus_per_worker=1.0,
        storage_path=storage,
        run_name=name,
        random_resized_crop=False,
        color_jitter=0.0,
    )


def plain_loop(args: argparse.Namespace, images: np.ndarray, labels: np.ndarray) -> float:
    """Images/s of a single-process loop over in-memory batches (3 warm-up steps excluded)."""
    torch.set_num_threads(args.threads)
    cfg = config(args, "unused", "unused", "plain", 1)
    pre = PreprocessConfig(input_size=args.image_size)
    model, _ = create_model(args.model, 10, args.image_size)
    optimizer, scheduler = build_optimizer(model, cfg, args.steps + 3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    for step in range(args.steps + 3):
        if step == 3:
            start = time.perf_counter()
        i = (step * args.batch_size) % (len(images) - args.batch_size)
        x = normalize(torch.from_numpy(images[i : i + args.batch_size]), pre)
        loss = loss_fn(model(x), torch.from_numpy(labels[i : i + args.batch_size]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def steady(lines: list[dict], key: str) -> float:
    """Mean of a step-line metric after the first epoch (warm-up: process start, first batches)."""
    values = [x[key] for x in lines if x["type"] == "step" and x["epoch"] > 1]
    return float(np.mean(values))


def ray_loop(
    args: argparse.Namespace, images: np.ndarray, labels: np.ndarray, storage: str, name: str, tensorboard: bool
) -> float:
    """Images/s of rayimgcls's worker loop in one Ray Train worker on the same in-memory data."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    n = args.steps * args.batch_size
    cfg = dataclasses.replace(config(args, "in-memory", storage, name, 3), tensorboard=tensorboard)
    data = ray.data.from_items([{"image": images[i], "label": labels[i]} for i in range(n)]).materialize()
    model, kwargs = create_model(args.model, 10, args.image_size)
    ctx = LoopContext(
        cfg=dataclasses.asdict(cfg),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        preprocess=PreprocessConfig.from_model(model, args.image_size).to_dict(),
        model_kwargs=kwargs,
        steps_per_epoch=args.steps,
        run_dir=os.path.join(storage, cfg.run_name),
        has_validation=False,
    )
    TorchTrainer(
        train_loop,
        train_loop_config={"ctx": ctx, "torch_threads": args.threads},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.0}),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage),
        datasets={"train": data},
    ).fit()
    return steady(RunDir(ctx.run_dir).read_metrics(), "images_per_s")


def data_wait(args: argparse.Namespace, root: str, storage: str, run: int) -> tuple[float, float]:
    """(share of time waiting for data, images/s) of a real run over JPEGs through the decode pipeline."""
    from rayimgcls.train import run as train

    summary = train(config(args, root, storage, f"pipeline-{run}", 3))
    lines = RunDir(os.path.join(storage, summary["run_name"])).read_metrics()
    return steady(lines, "data_wait"), steady(lines, "images_per_s")


def photo_dataset(args: argparse.Namespace, n: int) -> str:
    """n photo-size JPEGs (500x375) in the labels.csv format, all in the train subset."""
    from rayimgcls.synth import make_photo_jpegs

    root = Path(args.workdir) / "photos"
    paths = make_photo_jpegs(root / "images", n, (500, 375))
    rows = [f"images/{p.name},{i % 10},train," for i, p in enumerate(paths)]
    (root / "labels.csv").write_text("image_path,label,subset,metadata\n" + "\n".join(rows) + "\n")
    return str(root)


def main() -> None:
    import ray

    args = parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(logging_level="ERROR")
    rng = np.random.default_rng(0)
    n = (args.steps + 3) * args.batch_size
    images = rng.integers(0, 256, (n, 3, args.image_size, args.image_size), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    root = photo_dataset(args, args.steps * args.batch_size)
    plain, looped, untracked, waits, piped = [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as storage:
        for run in range(args.runs):  # interleaved, so drifting load hits both sides alike
            plain.append(plain_loop(args, images, labels))
            looped.append(ray_loop(args, images, labels, storage, f"loop-{run}", tensorboard=True))
            untracked.append(ray_loop(args, images, labels, storage, f"untracked-{run}", tensorboard=False))
            wait, rate = data_wait(args, root, storage, run)
            waits.append(wait)
            piped.append(rate)
            print(
                f"run {run + 1}: plain {plain[-1]:.1f} img/s, Ray Train loop {looped[-1]:.1f} img/s "
                f"({untracked[-1]:.1f} without TensorBoard), "
                f"Ray Data pipeline {piped[-1]:.1f} img/s waiting {100 * wait:.1f}% of the time",
                flush=True,
            )
    ray.shutdown()
    p, r, w = statistics.median(plain), statistics.median(looped), statistics.median(waits)
    u = statistics.median(untracked)
    print(
        f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.threads} torch thread(s), "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"median: plain loop {p:.1f} img/s, Ray Train loop {r:.1f} img/s ({r / p:.3f}x; {u:.1f} without "
        f"TensorBoard); "
        f"fed by Ray Data from JPEGs: {statistics.median(piped):.1f} img/s, waiting {100 * w:.1f}% of step time"
    )
    print(f"RESULT train_loop_vs_plain ratio={r / p:.3f} target=0.9")
    print(f"RESULT train_data_wait ratio={w:.4f} target=<0.05")
    print(f"RESULT train_tensorboard_overhead ratio={u / r - 1:.4f} target=<0.02")


if __name__ == "__main__":
    main()
