"""`rayimgcls demo`: data -> train -> infer -> evaluate on the local machine in a few minutes, on CPU.

The recipe below is the one the tests train with, so the demo's accuracy is checked on every CI run. Its
model is a ViT-Tiny-style hybrid from timm (`vit_tiny_r_s16_p8_224`: a convolutional stem, then
transformer blocks), shrunk to 3 blocks of width 96 at 32 px. A plain patch-embedding ViT trained from
scratch on a thousand images sits at chance for many epochs before it finds the shapes (measured while
building this: ~86% after 25 epochs); the convolutional stem ("early convolutions help transformers see
better") gets the same data above 90% in 12-15 epochs (0.98-0.99 in four runs; the slowest seen, 0.89).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rayimgcls import storage
from rayimgcls.config import InferConfig, TrainConfig

DEMO_MODEL = "vit_tiny_r_s16_p8_224"
DEMO_MODEL_KWARGS: dict[str, Any] = {
    "patch_size": 1,
    "depth": 3,
    "embed_dim": 96,
    "num_heads": 3,
    "global_pool": "avg",
    "class_token": False,
}
DEMO_RECIPE: dict[str, Any] = {
    "model": DEMO_MODEL,
    "model_kwargs": DEMO_MODEL_KWARGS,
    "image_size": 32,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "num_epochs": 15,
    "logging_steps": 13,
    # The shapes sit in the middle of each picture, upright to +-20 degrees: a centre crop with flips keeps
    # every label true, where ImageNet's random resized crop would often cut the shape away.
    "random_resized_crop": False,
    "hflip": 0.5,
    "vflip": 0.5,
    "color_jitter": 0.0,
    "precision": "fp32",
    "num_workers": 1,
}


def demo_train_config(data_root: str, storage_path: str, run_name: str, **overrides: Any) -> TrainConfig:
    # On a small machine the worker reserves one CPU (Ray Data keeps the rest) but may use every core:
    # the decode of 32 px images is light next to the model.
    threads = max(1, os.cpu_count() or 1)
    return TrainConfig(
        **{
            **DEMO_RECIPE,
            "torch_threads": threads,
            "data_root": data_root,
            "storage_path": storage_path,
            "run_name": run_name,
            **overrides,
        }
    )


@dataclass
class DemoResult:
    data_root: str
    model_dir: str
    result_dir: str
    accuracy: float
    seconds: float


def run_demo(
    out_dir: str = "rayimgcls-demo", num_images: int = 1200, num_epochs: int = 15, address: str | None = None
) -> DemoResult:
    """Make a shapes dataset under out_dir, train, predict its test subset and evaluate the predictions."""
    from rayimgcls.evaluate import evaluate, format_report
    from rayimgcls.infer import run_inference
    from rayimgcls.rundir import REPORT_FILE, RunDir
    from rayimgcls.synth import SynthConfig, make_dataset
    from rayimgcls.train import run

    started = time.time()
    out = os.path.abspath(out_dir)
    data_root = os.path.join(out, "data")
    result_dir = os.path.join(out, "predictions")
    _say(f"1/4 dataset: {num_images} shape images -> {data_root}")
    make_dataset(data_root, SynthConfig(num_images=num_images))
    _say("2/4 training a small ViT on Ray Train (CPU)")
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    summary = run(demo_train_config(data_root, os.path.join(out, "runs"), run_name, num_epochs=num_epochs), address)
    _say("3/4 batch inference on predictions.csv (the test subset) with Ray Data")
    infer_cfg = InferConfig(
        model_dir=summary["model_dir"], data_root=data_root, result_dir=result_dir, overwrite=True, precision="fp32"
    )
    _say(run_inference(infer_cfg, address).describe())
    _say("4/4 evaluation")
    report = evaluate(result_dir, data_root)
    _say(format_report(report, rows=4))
    result = DemoResult(data_root, summary["model_dir"], result_dir, float(report["accuracy"]), time.time() - started)
    run_dir = RunDir(storage.join(os.path.join(out, "runs"), run_name))
    _say(
        f"\ndemo done in {result.seconds:.0f} s: test accuracy {100 * result.accuracy:.1f}% "
        f"(chance {100 / len(report['per_class']):.0f}%)\n"
        f"  data:        {data_root}\n  run:         {run_dir.path}\n"
        f"  model:       {result.model_dir}\n  predictions: {result_dir}\n"
        f"open the reports:\n  training:    {run_dir.file(REPORT_FILE)}\n  evaluation:  {report['html']}\n"
        f"serve it:  rayimgcls serve --model-dir {result.model_dir}"
    )
    return result


def _say(message: str) -> None:
    print(message, flush=True)
