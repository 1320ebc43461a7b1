"""Batch inference speed: `rayimgcls infer` end to end against the model alone, and bf16 against fp32.

End to end is what a user waits for: read the CSV and the JPEG files, decode and resize in Ray Data tasks,
run the model in the actor pool, write the shards. Its rate is measured once the model actors run (from
the first lines back to the last), since starting them (a fresh process importing torch and timm, loading
the weights) is a fixed cost of several seconds per job that a long job amortises; that cost and the
plain wall-clock rate are printed too. The model alone is `Predictor.predict_batch` on uint8 tensors
decoded beforehand, in this process, with as many torch threads as the actor gets (one warm-up batch
excluded). Both run in the same process, interleaved run by run, on untrained weights of a real-size ViT
(`vit_small_patch16_224` at 224 by default: with a tiny model the decode dominates and the ratio says
little) and photo-size JPEGs from `rayimgcls.synth`.

    python benchmarks/bench_infer.py                      # about 5 minutes on 2 cores
    python benchmarks/bench_infer.py --images 64 --runs 3 # a quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from rayimgcls.infer import InferSummary


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--images", type=int, default=192, help="JPEGs per end-to-end run")
    p.add_argument("--model-images", type=int, default=64, help="images per model-only run")
    p.add_argument("--photo-size", default="500x375", help="WxH of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed runs of each kind (median reported)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--workdir", default="/tmp/rayimgcls-bench", help="where data, model and results go")
    return p.parse_args()


def make_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The photo data root (predictions.csv + JPEGs, plus warmup.csv) and an untrained model directory."""
    from rayimgcls.model import make_untrained_model_dir
    from rayimgcls.synth import make_photo_jpegs

    root, work = Path(args.workdir) / "photos", Path(args.workdir)
    width, height = (int(x) for x in args.photo_size.split("x"))
    paths = make_photo_jpegs(root / "images", args.images, (width, height))
    rels = [f"images/{p.name}" for p in paths]
    (root / "predictions.csv").write_text("image_path\n" + "\n".join(rels) + "\n")
    (root / "warmup.csv").write_text("image_path\n" + "\n".join(rels[: args.batch_size]) + "\n")
    model_dir = work / f"model-{args.model}-{args.image_size}-{args.num_classes}"
    if not (model_dir / "config.json").exists():
        make_untrained_model_dir(
            model_dir, model_name=args.model, num_classes=args.num_classes, image_size=args.image_size, precision="fp32"
        )
    return root, model_dir


def model_only(predictor, images: np.ndarray, batch_size: int) -> float:
    """images/s of predict_batch over pre-decoded uint8 images (one warm-up batch first)."""
    predictor.predict_batch(images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        predictor.predict_batch(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def end_to_end(
    root: Path,
    model_dir: Path,
    out: Path,
    batch_size: int,
    csv: str = "predictions.csv",
) -> InferSummary:
    from rayimgcls.config import InferConfig
    from rayimgcls.infer import run_inference

    cfg = InferConfig(
        model_dir=str(model_dir),
        data_root=str(root),
        result_dir=str(out),
        csv=csv,
        batch_size=batch_size,
        precision="fp32",
        overwrite=True,
    )
    summary = run_inference(cfg)
    assert summary.errors == 0 and summary.lines == summary.rows
    return summary


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray
    import torch

    from rayimgcls.images import preprocess
    from rayimgcls.model import Predictor, resolve_precision

    root, model_dir = make_inputs(args)
    fp32 = Predictor.from_dir(model_dir, device="cpu", precision="fp32")
    torch.set_num_threads(args.cpus)  # what the single CPU actor gets on this node (infer.plan_pool)
    paths = sorted((root / "images").iterdir())[: args.model_images]
    images = np.stack([preprocess(p.read_bytes(), fp32.card.preprocess) for p in paths])
    print(
        f"model {args.model} at {args.image_size} px, {args.num_classes} classes; {args.images} JPEGs of "
        f"{args.photo_size}; batch {args.batch_size}; {args.cpus} CPUs, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} (other processes skew every figure)"
    )

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    end_to_end(root, model_dir, Path(args.workdir) / "out", args.batch_size, csv="warmup.csv")  # warm-up
    runs: list[InferSummary] = []
    alone = []
    for run in range(args.runs):
        alone.append(model_only(fp32, images, args.batch_size))
        runs.append(end_to_end(root, model_dir, Path(args.workdir) / "out", args.batch_size))
        r = runs[-1]
        print(
            f"run {run + 1}: model only {alone[-1]:.2f} images/s; end to end {r.steady_images_per_s:.2f} "
            f"images/s once running, {r.images_per_s:.2f} images/s wall clock incl. "
            f"{r.startup_seconds:.1f} s of actor start-up"
        )
    ray.shutdown()
    e2e_med, alone_med = statistics.median(r.steady_images_per_s for r in runs), statistics.median(alone)
    wall_med = statistics.median(r.images_per_s for r in runs)
    startup_med = statistics.median(r.startup_seconds for r in runs)
    print(
        f"median: model only {alone_med:.2f} images/s; end to end (read + decode + model + write) "
        f"{e2e_med:.2f} images/s once running, {wall_med:.2f} images/s wall clock with {startup_med:.1f} s "
        f"start-up ({wall_med / alone_med:.3f}x)"
    )

    bf16 = Predictor(fp32.model, fp32.card, fp32.device, "bf16")
    fast = [model_only(bf16, images, args.batch_size) for _ in range(args.runs)]
    slow = [model_only(fp32, images, args.batch_size) for _ in range(args.runs)]
    diff = float(np.abs(bf16.predict_batch(images) - fp32.predict_batch(images)).max())
    auto = resolve_precision("auto", torch.device("cpu"), fp32.model, args.image_size)
    fast_med, slow_med = statistics.median(fast), statistics.median(slow)
    print(
        f"model only: bf16 {fast_med:.2f} images/s, fp32 {slow_med:.2f} images/s; "
        f"largest probability difference {diff:.5f}; precision auto picks {auto}"
    )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"RESULT infer_e2e_vs_model ratio={e2e_med / alone_med:.3f} target=0.8")
    print(f"RESULT infer_bf16_speedup ratio={fast_med / slow_med:.3f} target=1.2 max_prob_diff={diff:.5f} auto={auto}")


if __name__ == "__main__":
    main()
