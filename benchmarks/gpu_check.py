"""One command that checks and measures rayimgcls on a GPU: training, batch inference, Serve and parity.

    python benchmarks/gpu_check.py --out /tmp/gpu-check        # on a GPU machine: < 5 minutes on one H200
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry    # anywhere: the same flow on the CPU, tiny
    python benchmarks/gpu_check.py --no-ray --out /tmp/g       # the tier without Ray (automatic without it)
    python benchmarks/gpu_check.py --out /tmp/g --stages serve,parity   # a rerun of what failed

Stages, each timed and recorded, a failure recorded and the next stage run:
  versions   nvidia-smi, torch, CUDA, cuDNN, timm, Ray, the TF32 settings
  decode     images/s one CPU decodes through the training transform (data.decode_batch, in-process)
  synthetic  the plain baseline: the model's train step (normalise, forward, backward, AdamW) on uint8
             tensors already on the device: images/s, peak memory, FLOPs per image (counted), MFU against
             the bf16 peak (printed), and the CPUs of decoding that rate needs
  train      `rayimgcls.train.run`: 1 worker (use_gpu), precision auto, JPEGs decoded by the Ray Data
             pipeline; images/s and data-wait share after the first epoch, against `synthetic`
  infer      `rayimgcls.infer.run_inference` with a GPU actor: steady images/s against the model alone
  serve      `rayimgcls.serve.build_app`, a GPU replica at concurrency C, batching on against off, p50/p99
  parity     a small model trained a few steps on the device; the same files through infer, Serve and
             Predictor agree (fp32 with TF32 off: 1e-5, bf16: 1e-3); device bf16 vs CPU fp32 within 1e-2
Without Ray (not importable, or --no-ray): versions, decode, synthetic, `predictor` (model-only rate) and
parity through Predictor only, the model trained by a plain loop and saved with `save_model_dir`.

It writes OUT/gpu_check.json (every figure) and OUT/gpu_check.log (everything printed), ends with RESULT
lines, and exits 1 naming the stages that failed. --dry-run needs no GPU and installs nothing; a test runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Dense bf16 peaks from the vendors' datasheets (SXM parts), by a substring of torch's device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}
CROSS_DEVICE_TOLERANCE = 1e-2  # device bf16 against CPU fp32
LOG_FILE, JSON_FILE = "gpu_check.log", "gpu_check.json"
STAGES = ("versions", "decode", "synthetic", "train", "infer", "serve", "parity", "predictor")


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the defaults are the GPU run (< 5 minutes on one H200), `dry()` takes seconds per
    stage on a CPU."""

    device: str = "cuda"
    model: str = "vit_base_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    image_size: int = 224
    unique_images: int = 1536  # rendered once (~10 ms each)
    repeat: int = 4  # train rows listed this many times: decoding is per row, rendering is not
    photo_size: tuple[int, int] = (256, 384)  # smallest and largest side of the rendered JPEGs and PNGs
    batch_size: int = 256  # training, one worker
    epochs: int = 4  # the first is warm-up
    warmup_steps: int = 5
    synthetic_steps: int = 30
    infer_batch: int = 256
    infer_repeat: int = 6  # infer.csv lists every image this many times
    model_batches: int = 20
    serve_seconds: float = 10.0
    concurrency: int = 32
    serve_max_batch: int = 32
    ingress_replicas: int = 4  # they decode: one would cap what batching can show
    parity_model: str | None = "vit_tiny_patch16_224"  # None: the train stage's model is small already
    parity_kwargs: dict = field(default_factory=dict)
    parity_size: int = 224
    parity_epochs: int = 3
    parity_images: int = 16

    def parity_spec(self) -> tuple[str, dict, int]:
        """timm name, kwargs and size of the model parity is checked on."""
        if self.parity_model is None:
            return self.model, self.model_kwargs, self.image_size
        return self.parity_model, self.parity_kwargs, self.parity_size

    @classmethod
    def dry(cls) -> Plan:
        return cls(
            device="cpu",
            model="vit_tiny_patch16_224",
            model_kwargs={"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2},
            image_size=32,
            unique_images=96,
            repeat=1,
            photo_size=(40, 64),
            batch_size=16,
            epochs=2,
            warmup_steps=1,
            synthetic_steps=3,
            infer_batch=16,
            infer_repeat=1,
            model_batches=3,
            serve_seconds=2.0,
            serve_max_batch=16,
            ingress_replicas=1,
            parity_model=None,
            parity_images=8,
        )


# ---------------------------------------------------------------------------------------------------------
# Recording: stages, the log, the JSON


class Tee:
    """Everything this process prints goes to the terminal and the log (Ray's forwarded worker lines too)."""

    def __init__(self, stream: Any, log: Any) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Check:
    def __init__(self, out: Path, mode: str, tier: str, plan: Plan, only: set[str] | None = None) -> None:
        self.out, self.results, self.only = out, [], only
        self.doc: dict[str, Any] = {"mode": mode, "tier": tier, "plan": dataclasses.asdict(plan), "stages": {}}

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one stage, `fn(record, *args)`: its figures go into the record, a failure is recorded and does
        not stop the next stage. Returns what fn returned (None when it failed or was not asked for)."""
        record: dict[str, Any] = {}
        self.doc["stages"][name] = record
        if self.only is not None and name not in self.only:
            record["skipped"] = True
            return None
        print(f"\n=== {name}", flush=True)
        start, out = time.perf_counter(), None
        try:
            out = fn(record, *args)
            record["ok"] = True
        except Exception as e:  # noqa: BLE001 - every failure is a finding: record it, run the next stage
            traceback.print_exc()
            record.update(ok=False, error=f"{type(e).__name__}: {e}".strip()[:2000])
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(f"=== {name}: {'ok' if record['ok'] else 'FAILED: ' + record['error']} ({record['seconds']} s)")
        self.save()
        return out

    def result(self, name: str, ratio: float, target: str, note: str = "") -> None:
        self.results.append({"name": name, "ratio": ratio, "target": target, "note": note})
        self.doc["results"] = self.results

    def failed(self) -> list[str]:
        return [n for n, r in self.doc["stages"].items() if r.get("ok") is False]

    def save(self) -> None:
        (self.out / JSON_FILE).write_text(json.dumps(self.doc, indent=2, default=str) + "\n")


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Stages shared by both tiers


def versions(rec: dict, device: str) -> None:
    import timm
    import torch

    import rayimgcls

    rec.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        timm=timm.__version__,
        rayimgcls=rayimgcls.__version__,
        cpus=os.cpu_count(),
        matmul_fp32_precision=getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        cudnn_conv_fp32_precision=getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None),
    )
    try:
        import ray

        rec["ray"] = ray.__version__
    except ImportError as e:
        rec["ray"] = f"not importable ({e})"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch (use --dry-run on a machine without a GPU)")
        props = torch.cuda.get_device_properties(0)
        rec.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)))
        rec["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        print(smi.stdout)
        rec["nvidia_smi"] = smi.stdout.splitlines()[2:4]
    print(json.dumps({k: v for k, v in rec.items() if k != "nvidia_smi"}, indent=1))


def make_data(work: Path, plan: Plan) -> Path:
    """The generated dataset: `unique_images` JPEGs/PNGs, the train rows of labels.csv repeated `repeat` times,
    and infer.csv (every image `infer_repeat` times) for batch inference."""
    import pandas as pd

    from rayimgcls.synth import SynthConfig, make_dataset

    root = work / "data"
    if not (root / "infer.csv").exists():
        cfg = SynthConfig(num_images=plan.unique_images, min_size=plan.photo_size[0], max_size=plan.photo_size[1])
        make_dataset(root, dataclasses.replace(cfg, split=(0.9, 0.05, 0.05)))
        labels = pd.read_csv(root / "labels.csv", keep_default_na=False)
        train = labels[labels["subset"] == "train"]
        pd.concat([*[train] * plan.repeat, labels[labels["subset"] != "train"]]).to_csv(
            root / "labels.csv", index=False
        )
        infer = pd.concat([labels[["image_path"]]] * plan.infer_repeat)
        infer.to_csv(root / "infer.csv", index=False)
    return root


def decode_rate(rec: dict, root: Path, plan: Plan) -> None:
    """One CPU through the training decode (the Ray Data UDF called here): images/s per CPU."""
    import pandas as pd

    from rayimgcls.data import DecodeSpec, decode_batch
    from rayimgcls.images import Augment, PreprocessConfig

    paths = pd.read_csv(root / "labels.csv", keep_default_na=False)["image_path"].unique()[: max(64, plan.batch_size)]
    batch = {"row": np.arange(len(paths)), "image_path": paths}
    spec = DecodeSpec(str(root), "labels.csv", PreprocessConfig(input_size=plan.image_size), Augment())
    decode_batch(batch, spec)  # warm-up: imports, PIL plugins
    seconds = min(timed(lambda: decode_batch(batch, spec), lambda: None) for _ in range(3))
    rec["images_per_s_per_cpu"] = round(len(batch["row"]) / seconds, 1)
    print(f"training decode on one CPU: {rec['images_per_s_per_cpu']} images/s ({plan.photo_size} px sources)")


def vit_forward_flops(model: Any) -> float | None:
    """Forward FLOPs per image of a timm VisionTransformer from its shape (2 FLOPs a multiply-add): patch
    embedding, per block qkv + proj (4 N D^2), MLP (2 N D H), attention scores and mixing (2 N^2 D), head."""
    try:
        d, n_patch, blocks = model.embed_dim, model.patch_embed.num_patches, len(model.blocks)
        proj, hidden = model.patch_embed.proj, model.blocks[0].mlp.fc1.out_features
    except AttributeError:
        return None
    n = n_patch + model.num_prefix_tokens
    patch = n_patch * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * d
    per_block = n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d
    head = d * getattr(model.head, "out_features", 0)
    return 2.0 * (patch + blocks * per_block + head)


def counted_flops(name: str, kwargs: dict, size: int, classes: int) -> tuple[float, float | None]:
    """Forward FLOPs per image counted by torch's FlopCounterMode on the meta device (no memory, no compute),
    and the ViT formula's figure for comparison."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rayimgcls.model import create_model

    with torch.device("meta"):
        model, _ = create_model(name, classes, size, model_kwargs=kwargs)
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops()), vit_forward_flops(model)


def bf16_peak(device: str, override: float | None) -> tuple[float, str]:
    """FLOP/s the MFU is measured against, and where the figure comes from."""
    import torch

    if override:
        return override * 1e12, "--peak-tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, tflops in BF16_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"datasheet dense bf16 of {key}"
    n = 1024 if device == "cuda" else 256  # no datasheet figure: a measured bf16 matmul stands in
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    seconds = min(timed(lambda: a @ a, sync) for _ in range(5))
    return 2 * n**3 / seconds, f"measured {n}^3 bf16 matmul (no datasheet figure for this device)"


def synthetic(rec: dict, plan: Plan, classes: int, peak_override: float | None) -> None:
    """The plain baseline: train steps on uint8 batches already on the device."""
    import torch

    from rayimgcls.images import PreprocessConfig, normalize
    from rayimgcls.model import create_model, resolve_precision

    device = torch.device(plan.device)
    bf16 = device.type == "cuda" and resolve_precision("auto", device) == "bf16"  # what the worker's auto picks
    torch.manual_seed(0)
    model, _ = create_model(plan.model, classes, plan.image_size, model_kwargs=plan.model_kwargs)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pre = PreprocessConfig(input_size=plan.image_size)
    x = torch.randint(0, 256, (plan.batch_size, 3, plan.image_size, plan.image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (plan.batch_size,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(normalize(x, pre)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(plan.warmup_steps):
        step()
    seconds = timed(lambda: [step() for _ in range(plan.synthetic_steps)], sync)
    rate = plan.synthetic_steps * plan.batch_size / seconds
    forward, formula = counted_flops(plan.model, plan.model_kwargs, plan.image_size, classes)
    peak, source = bf16_peak(plan.device, peak_override)
    train_flops = 3 * forward  # backward = 2x forward
    rec.update(
        precision="bf16" if bf16 else "fp32",
        images_per_s=round(rate, 1),
        forward_gflops_per_image=round(forward / 1e9, 4),
        forward_gflops_formula=round(formula / 1e9, 4) if formula else None,
        peak_tflops=round(peak / 1e12, 1),
        peak_source=source,
        mfu=round(rate * train_flops / peak, 4),
    )
    if device.type == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(
        f"synthetic: {rate:.1f} images/s ({rec['precision']}, batch {plan.batch_size}); {forward / 1e9:.3f} GFLOPs "
        f"forward per image (formula {rec['forward_gflops_formula']}), x3 for training; MFU {rec['mfu']:.3f} "
        f"of {rec['peak_tflops']} TFLOP/s bf16 ({source})"
    )


def model_only_rate(model_dir: Path, root: Path, plan: Plan, precision: str | None = None) -> float:
    """images/s of Predictor.predict_batch on decoded uint8 images in this process (warm-up excluded)."""
    import torch

    from rayimgcls.images import preprocess
    from rayimgcls.model import Predictor

    predictor = Predictor.from_dir(model_dir, device=plan.device, precision=precision)
    files = sorted((root / "images").iterdir())[: plan.infer_batch]
    images = np.stack([preprocess(p.read_bytes(), predictor.card.preprocess) for p in files])
    images = np.concatenate([images] * math.ceil(plan.infer_batch / len(images)))[: plan.infer_batch]
    predictor.predict_batch(images)
    sync = torch.cuda.synchronize if plan.device == "cuda" else (lambda: None)
    seconds = timed(lambda: [predictor.predict_batch(images) for _ in range(plan.model_batches)], sync)
    return plan.model_batches * len(images) / seconds


def compare(name: str, a: np.ndarray, b: np.ndarray, tol: float, rec: dict) -> None:
    diff = float(np.abs(a - b).max())
    rec[name] = {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol}
    print(f"  {name}: max |diff| {diff:.2e} (tolerance {tol:g}) {'ok' if diff <= tol else 'EXCEEDED'}")


def parity_predictor(rec: dict, model_dir: Path, files: list[Path], plan: Plan) -> dict[str, np.ndarray]:
    """Predictor on the device in both precisions (whole batch and one image at a time) and on the CPU in fp32;
    returns the device probabilities by precision for the Ray paths to compare with."""
    from rayimgcls.model import Predictor

    cpu = np.array([r["predictions"] for r in Predictor.from_dir(model_dir, "cpu", "fp32").predict(files)])
    spread = float((cpu.max(axis=1) - cpu.min(axis=1)).mean())
    rec["mean_prob_spread"] = spread
    if spread < 0.02:
        raise RuntimeError(f"outputs are near uniform (mean max-min probability {spread:.4f}): train longer")
    out = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor.from_dir(model_dir, plan.device, precision)
        batch = np.array([r["predictions"] for r in predictor.predict(files)])
        single = np.array([predictor.predict([f])[0]["predictions"] for f in files])
        compare(f"predictor_batch_vs_single_{precision}", batch, single, TOLERANCE[precision], rec)
        out[precision] = batch
    compare(f"{plan.device}_bf16_vs_cpu_fp32", out["bf16"], cpu, CROSS_DEVICE_TOLERANCE, rec)
    rec[f"{plan.device}_fp32_vs_cpu_fp32_max_abs_diff"] = float(np.abs(out["fp32"] - cpu).max())
    return out


def failed_comparisons(rec: dict) -> list[str]:
    return [k for k, v in rec.items() if isinstance(v, dict) and v.get("ok") is False]


# ---------------------------------------------------------------------------------------------------------
# The Ray tier


def train_config(plan: Plan, root: Path, work: Path, name: str, model: str, kwargs: dict, size: int, epochs: int):
    from rayimgcls.config import TrainConfig

    return TrainConfig(
        data_root=str(root),
        model=model,
        model_kwargs=kwargs,
        image_size=size,
        batch_size=plan.batch_size,
        num_epochs=epochs,
        learning_rate=1e-3 if model != plan.model or plan.device == "cpu" else 1e-4,
        logging_steps=max(1, plan.warmup_steps),
        precision="auto",
        use_gpu=plan.device == "cuda",
        storage_path=str(work / "runs"),
        run_name=name,
        num_to_keep=1,
    )


def train_stage(rec: dict, plan: Plan, root: Path, work: Path, synthetic_rate: float | None) -> Path:
    from rayimgcls.train import run

    cfg = train_config(plan, root, work, "speed", plan.model, plan.model_kwargs, plan.image_size, plan.epochs)
    summary = run(cfg)
    steps = [json.loads(x) for x in (work / "runs" / "speed" / "metrics.jsonl").read_text().splitlines()]
    steady = [s for s in steps if s.get("type") == "step" and s["epoch"] > 1]  # the first epoch is warm-up
    if not steady:
        raise RuntimeError("no step lines after the first epoch in metrics.jsonl: raise --epochs")
    rate = statistics.median(s["images_per_s"] for s in steady)
    wait = statistics.mean(s["data_wait"] for s in steady)
    rec.update(images_per_s=rate, data_wait=round(wait, 4), steps_measured=len(steady), model_dir=summary["model_dir"])
    rec["summary_images_per_s"] = summary.get("images_per_s")
    print(f"train: {rate:.1f} images/s after the first epoch, data wait {100 * wait:.1f}% of step time")
    if synthetic_rate:
        rec["vs_synthetic"] = round(rate / synthetic_rate, 3)
    return Path(summary["model_dir"])


def infer_run(model_dir: Path, root: Path, out: Path, plan: Plan, csv: str, precision: str | None = None):
    from rayimgcls.config import InferConfig
    from rayimgcls.infer import run_inference

    cfg = InferConfig(
        model_dir=str(model_dir),
        data_root=str(root),
        result_dir=str(out),
        csv=csv,
        batch_size=plan.infer_batch,
        use_gpu=plan.device == "cuda",
        precision=precision,
        overwrite=True,
    )
    summary = run_inference(cfg)
    if summary.errors or summary.lines != summary.rows:
        raise RuntimeError(f"inference wrote {summary.lines} lines for {summary.rows} rows, {summary.errors} errors")
    return summary


def shard_probs(result_dir: Path) -> dict[int, np.ndarray]:
    """row -> probabilities from the written shards (predictions-*.jsonl, DESIGN §5)."""
    out = {}
    for shard in sorted(result_dir.glob("predictions-*.jsonl")):
        for line in shard.read_text().splitlines():
            d = json.loads(line)
            out[d["row"]] = np.array(d["predictions"])
    return out


def infer_stage(rec: dict, plan: Plan, model_dir: Path, root: Path, work: Path) -> None:
    summary = infer_run(model_dir, root, work / "infer", plan, "infer.csv")
    model = model_only_rate(model_dir, root, plan)
    rec.update(
        rows=summary.rows,
        steady_images_per_s=round(summary.steady_images_per_s, 1),
        wall_images_per_s=round(summary.images_per_s, 1),
        startup_seconds=round(summary.startup_seconds, 1),
        model_only_images_per_s=round(model, 1),
        e2e_vs_model=round(summary.steady_images_per_s / model, 3),
    )
    print(f"infer: {summary.describe()}\n  model only {model:.1f} images/s")


@contextmanager
def serve_apps(apps: dict[str, dict], port: int):
    """Deploy applications (name -> build_app settings) at once, yield name -> classify URL, delete them."""
    from ray import serve

    from rayimgcls.serve import build_app

    quiet = {"log_level": "WARNING"}  # a log line per request buries the figures
    serve.run_many([serve.RunTarget(build_app(s), n, f"/{n}", logging_config=quiet) for n, s in apps.items()])
    try:
        yield {n: f"http://127.0.0.1:{port}/{n}/v1/classify" for n in apps}
    finally:
        for name in apps:
            serve.delete(name)


def deployments(apps: dict[str, dict], plan: Plan) -> list[dict[str, dict]]:
    """Groups of applications to deploy together: all at once on CPUs; one at a time on the GPU, where each
    model replica takes the whole device (ServeConfig has no fractional GPU share yet)."""
    return [apps] if plan.device == "cpu" else [{n: s} for n, s in apps.items()]


def serve_settings(model_dir: Path, plan: Plan, **overrides: Any) -> dict:
    gpu = plan.device == "cuda"
    return {
        "model_dir": str(model_dir),
        "use_gpu": gpu,
        "num_cpus": 1.0 if gpu else 0.5,
        "ingress_num_cpus": 1.0 if gpu else 0.25,
        "ingress_replicas": plan.ingress_replicas,
        "max_batch_size": plan.serve_max_batch,
        "max_concurrent_batches": 2,
        **overrides,
    }


def serve_stage(rec: dict, plan: Plan, model_dir: Path, root: Path, port: int) -> None:
    from bench_serve import load  # benchmarks/ is on sys.path: this script lives there

    bodies = [p.read_bytes() for p in sorted((root / "images").iterdir())[:64]]
    apps = {
        "batched": serve_settings(model_dir, plan),
        "unbatched": serve_settings(model_dir, plan, max_batch_size=1),
    }
    for group in deployments(apps, plan):
        with serve_apps(group, port) as urls:
            for label, url in urls.items():
                load(url, bodies, 8, 32, 60)  # warm-up: connections, lazy inits, allocator
                stats = load(url, bodies, plan.concurrency, 10**6, plan.serve_seconds)
                if stats.errors:
                    raise RuntimeError(f"{label}: {stats.errors} failed requests")
                rec[label] = dataclasses.asdict(stats)
                print(f"serve {label} c={plan.concurrency}: {stats.rps:.1f} images/s, p50 {stats.p50_ms:.0f} ms, "
                      f"p99 {stats.p99_ms:.0f} ms")  # fmt: skip
    rec["batching_speedup"] = round(rec["batched"]["rps"] / rec["unbatched"]["rps"], 3)


def classify(url: str, body: bytes) -> np.ndarray:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return np.array(json.loads(r.read())["results"][0]["predictions"])


def parity_files(root: Path, plan: Plan) -> list[Path]:
    """Every format the generator writes among the first files: JPEG, PNG, grayscale, RGBA, EXIF-rotated."""
    return sorted((root / "images").iterdir())[: plan.parity_images]


def parity_stage(rec: dict, plan: Plan, model_dir: Path | None, root: Path, work: Path, port: int) -> None:
    if plan.parity_model is not None or model_dir is None:
        from rayimgcls.train import run

        cfg = train_config(plan, root, work, "parity", *plan.parity_spec(), plan.parity_epochs)
        model_dir = Path(run(cfg)["model_dir"])
    rec["model_dir"] = str(model_dir)
    files = parity_files(root, plan)
    rels = [f"images/{f.name}" for f in files]
    (root / "parity.csv").write_text("image_path\n" + "\n".join(rels) + "\n")
    device = parity_predictor(rec, model_dir, files, plan)
    for precision in ("fp32", "bf16"):
        infer_run(model_dir, root, work / f"parity-{precision}", plan, "parity.csv", precision)
        by_row = shard_probs(work / f"parity-{precision}")
        infer = np.array([by_row[row] for row in range(2, len(files) + 2)])  # header = line 1
        compare(f"infer_vs_predictor_{precision}", infer, device[precision], TOLERANCE[precision], rec)
    apps = {p: serve_settings(model_dir, plan, precision=p, ingress_replicas=1) for p in ("fp32", "bf16")}
    for group in deployments(apps, plan):
        with serve_apps(group, port) as urls:
            for precision, url in urls.items():  # one image per request: batches differ from infer's
                served = np.array([classify(url, f.read_bytes()) for f in files])
                compare(f"serve_vs_predictor_{precision}", served, device[precision], TOLERANCE[precision], rec)
    if failed_comparisons(rec):
        raise RuntimeError(f"parity exceeded: {', '.join(failed_comparisons(rec))}")


def ray_tier(check: Check, plan: Plan, root: Path, work: Path, args: argparse.Namespace) -> None:
    import ray
    from bench_serve import free_port
    from ray import serve

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    for name in ("ray.serve", "ray.data", "ray.train"):  # the driver's own INFO lines; errors still show
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    try:
        synthetic_rate = check.doc["stages"]["synthetic"].get("images_per_s")
        # without a trained model (train failed or not asked for) infer and Serve run on untrained weights
        model_dir = check.run("train", train_stage, plan, root, work, synthetic_rate) or untrained(plan, work)
        check.run("infer", infer_stage, plan, model_dir, root, work)
        check.run("serve", serve_stage, plan, model_dir, root, port)
        check.run("parity", parity_stage, plan, None if plan.parity_model else model_dir, root, work, port)
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------------
# The tier without Ray


def plain_train(plan: Plan, root: Path, out: Path) -> Path:
    """The parity model without Ray: the project's model and decode, plain train steps on the device, saved
    from device tensors with save_model_dir."""
    import pandas as pd
    import torch

    from rayimgcls.card import ModelCard
    from rayimgcls.images import Augment, PreprocessConfig, normalize, preprocess
    from rayimgcls.model import create_model, save_model_dir

    name, kwargs, size = plan.parity_spec()
    labels = pd.read_csv(root / "labels.csv", keep_default_na=False).drop_duplicates("image_path")
    classes = json.loads((root / "class_to_idx.json").read_text())
    torch.manual_seed(0)
    model, kwargs = create_model(name, len(classes), size, model_kwargs=kwargs)
    pre = PreprocessConfig.from_model(model, size)
    device = torch.device(plan.device)
    model.to(device).train()
    x = torch.from_numpy(np.stack([preprocess((root / p).read_bytes(), pre, Augment()) for p in labels["image_path"]]))
    y = torch.tensor([int(str(v).split()[0]) for v in labels["label"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(plan.parity_epochs):
        for i in range(0, len(x) - plan.batch_size + 1, plan.batch_size):
            xb, yb = x[i : i + plan.batch_size].to(device), y[i : i + plan.batch_size].to(device)
            loss = torch.nn.functional.cross_entropy(model(normalize(xb, pre)), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    card = ModelCard(name, kwargs, len(classes), False, list(classes), pre, precision="auto")
    save_model_dir(model, card, out)
    return out


def untrained(plan: Plan, work: Path) -> Path:
    """The speed model with random weights (what training would have exported), for the model-only rate."""
    from rayimgcls.model import make_untrained_model_dir

    out = work / "untrained"
    if not (out / "config.json").exists():
        make_untrained_model_dir(out, model_name=plan.model, image_size=plan.image_size,
                                 model_kwargs=plan.model_kwargs, precision="auto")  # fmt: skip
    return out


def predictor_stage(rec: dict, plan: Plan, root: Path, work: Path) -> None:
    rec["model_only_images_per_s"] = round(model_only_rate(untrained(plan, work), root, plan), 1)
    print(f"predictor: {plan.model} {rec['model_only_images_per_s']} images/s model only")


def plain_parity_stage(rec: dict, plan: Plan, root: Path, work: Path) -> None:
    model_dir = plain_train(plan, root, work / "plain-model")
    parity_predictor(rec, model_dir, parity_files(root, plan), plan)
    if failed_comparisons(rec):
        raise RuntimeError(f"parity exceeded: {', '.join(failed_comparisons(rec))}")


def no_ray_tier(check: Check, plan: Plan, root: Path, work: Path) -> None:
    check.run("predictor", predictor_stage, plan, root, work)
    check.run("parity", plain_parity_stage, plan, root, work)


# ---------------------------------------------------------------------------------------------------------


def report(check: Check, plan: Plan) -> None:
    """RESULT lines from what the stages measured (a failed stage gives none)."""
    s = check.doc["stages"]
    prefix = "gpu" if plan.device == "cuda" else "dryrun"
    synth, decode, train = s.get("synthetic", {}), s.get("decode", {}), s.get("train", {})
    if synth.get("ok") and decode.get("ok"):
        need = synth["images_per_s"] / decode["images_per_s_per_cpu"]
        synth["decode_cpus_needed"] = round(need, 1)
        print(f"decoding for {synth['images_per_s']:.0f} images/s needs about {need:.1f} CPUs")
    if synth.get("ok"):
        check.result(f"{prefix}_train_mfu", synth["mfu"], "informational", f"peak {synth['peak_source']}")
    if train.get("ok") and "vs_synthetic" in train:
        check.result(f"{prefix}_train_vs_synthetic", train["vs_synthetic"], "0.9")
        check.result(f"{prefix}_train_data_wait", train["data_wait"], "<0.05")
    if s.get("infer", {}).get("ok"):
        check.result(f"{prefix}_infer_e2e_vs_model", s["infer"]["e2e_vs_model"], "0.8")
    if s.get("serve", {}).get("ok"):
        check.result(f"{prefix}_serve_batching", s["serve"]["batching_speedup"], "3.0",
                     f"c={plan.concurrency} p50/p99 {s['serve']['batched']['p50_ms']:.0f}/"
                     f"{s['serve']['batched']['p99_ms']:.0f} ms batched")  # fmt: skip
    print()
    for r in check.results:
        note = f" ({r['note']})" if r["note"] else ""
        print(f"RESULT {r['name']} ratio={r['ratio']:.3f} target={r['target']}{note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where gpu_check.json and gpu_check.log go")
    p.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU, tiny sizes")
    p.add_argument("--no-ray", action="store_true", help="the tier without Ray even when Ray is importable")
    p.add_argument("--workdir", type=Path, help="data, runs and results (default OUT/work, deleted at the end)")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak for the MFU (default: datasheet by GPU name)")
    p.add_argument(
        "--stages",
        help="comma-separated stages to run (a rerun of what failed), e.g. serve,parity; versions always runs",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # This checkout's rayimgcls, here and in every Ray worker (which start in other folders)
    repo = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    log = (args.out / LOG_FILE).open("w")
    sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
    plan = Plan.dry() if args.dry_run else Plan()
    try:
        import ray  # noqa: F401

        tier = "no-ray" if args.no_ray else "ray"
    except ImportError:
        tier = "no-ray"
    only = {"versions", *args.stages.split(",")} if args.stages else None
    if only and only - set(STAGES):
        raise SystemExit(f"error: --stages: unknown {', '.join(sorted(only - set(STAGES)))} (stages: {STAGES})")
    check = Check(args.out, "dry-run" if args.dry_run else "gpu", tier, plan, only)
    work = args.workdir or args.out / "work"
    started = time.perf_counter()
    print(f"gpu_check: {check.doc['mode']}, tier {tier}, device {plan.device}, work in {work}")
    check.run("versions", versions, plan.device)
    rec = check.doc["stages"]["versions"]
    if rec.get("ok") is False:  # no GPU (or no torch): every later stage would fail the same way
        print(f"\ngpu_check stopped: FAILED stages: versions ({rec['error']}); {args.out / JSON_FILE}")
        return 1
    root = make_data(work, plan)
    classes = len(json.loads((root / "class_to_idx.json").read_text()))
    check.run("decode", decode_rate, root, plan)
    check.run("synthetic", synthetic, plan, classes, args.peak_tflops)
    if plan.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the baseline's model and optimizer are gone; the train worker needs the memory
    if tier == "ray":
        ray_tier(check, plan, root, work, args)
    else:
        no_ray_tier(check, plan, root, work)
    report(check, plan)
    check.doc["seconds"] = round(time.perf_counter() - started, 1)
    check.save()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    failed = check.failed()
    print(f"\ngpu_check done in {check.doc['seconds']} s: " + (f"FAILED stages: {', '.join(failed)}" if failed else
          f"all {len(check.doc['stages'])} stages passed") + f"; {args.out / JSON_FILE}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
