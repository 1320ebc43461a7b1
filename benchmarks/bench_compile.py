"""Does --torch-compile speed up a ViT training step here? Eager against `module.compile()` (what the worker loop
does with --torch-compile), the same model, initial weights and batches on both sides.

A step is the worker loop's own: normalise uint8 images, `loop.backward` (forward, cross-entropy, backward),
AdamW and OneCycleLR from `loop.build_optimizer`. The compiled side's first step compiles: it is timed on its
own, with an empty inductor cache as on a fresh machine, and again in a new process that finds the cache warm
(a second run on the same machine); it is excluded, as are the warm-up steps of both sides. Each run times
--steps steps per side, taken in turn (eager, compiled, eager, ...); the ratio is the median over runs of eager /
compiled seconds per step within a run. It is informational: there is no target.

    python benchmarks/bench_compile.py                                 # the demo's ViT at 32 px, ~2 min on 2 cores
    python benchmarks/bench_compile.py --model vit_tiny_patch16_224 --model-kwargs '{}' --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WARMUP = 3


def parse_args() -> argparse.Namespace:
    from rayimgcls.demo import DEMO_MODEL, DEMO_MODEL_KWARGS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--model-kwargs", default=json.dumps(DEMO_MODEL_KWARGS), help="timm kwargs as JSON")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side and run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker's default on this machine)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--first-step-only", action="store_true", help=argparse.SUPPRESS)  # the warm-cache process
    return p.parse_args()


class Side:
    """One model + optimizer + schedule, eager or compiled, stepping through the shared batches."""

    def __init__(self, args: argparse.Namespace, compiled: bool) -> None:
        import torch

        from rayimgcls.config import TrainConfig
        from rayimgcls.images import PreprocessConfig
        from rayimgcls.model import create_model
        from rayimgcls.train.loop import build_optimizer

        torch.manual_seed(0)
        self.model, _ = create_model(args.model, 10, args.image_size, model_kwargs=json.loads(args.model_kwargs))
        self.model.train()
        self.pre = PreprocessConfig.from_model(self.model, args.image_size)
        cfg = TrainConfig(data_root="unused", learning_rate=1e-3, batch_size=args.batch_size)
        total = WARMUP + 1 + args.runs * args.steps
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, total)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        if compiled:
            self.model.compile()

    def step(self, images, labels) -> float:
        """One training step; returns its loss."""
        from rayimgcls.images import normalize
        from rayimgcls.train.loop import backward

        loss = backward(self.model, normalize(images, self.pre), labels, self.loss_fn, None, 1, sync=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(self, batch: tuple) -> float:
        """Seconds of one step."""
        start = time.perf_counter()
        self.step(*batch)
        return time.perf_counter() - start


def make_batches(args: argparse.Namespace) -> list:
    import torch

    rng = np.random.default_rng(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    return [
        (torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)), torch.from_numpy(rng.integers(0, 10, shape[0])))
        for _ in range(8)
    ]


def warm_first_step(args: argparse.Namespace) -> float:
    """The compiled first step in a new process that finds the inductor cache filled (a second run here)."""
    keep = ["--model", args.model, "--model-kwargs", args.model_kwargs, "--image-size", str(args.image_size)]
    keep += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(
        [sys.executable, __file__, "--first-step-only", *keep], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    args = parse_args()
    if args.first_step_only:
        first_step(args)
        return
    # An empty inductor cache, as on a fresh machine (set before torch loads); removed at the end.
    with tempfile.TemporaryDirectory(prefix="bench-compile-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        measure(args)


def first_step(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    compiled = Side(args, compiled=True)
    start = time.perf_counter()
    compiled.step(*make_batches(args)[0])
    print(f"{time.perf_counter() - start:.3f}")


def measure(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    batches = make_batches(args)
    compiled = Side(args, compiled=True)
    start = time.perf_counter()
    compiled_first = compiled.step(*batches[0])
    compile_s = time.perf_counter() - start
    warm_s = warm_first_step(args)
    eager = Side(args, compiled=False)
    eager_first = eager.step(*batches[0])
    for i in range(1, WARMUP + 1):
        eager.step(*batches[i])
        compiled.step(*batches[i])
    eager_s, compiled_s = [], []
    for run in range(args.runs):  # step by step in turn, so drifting load hits both sides alike
        offset = WARMUP + 1 + run * args.steps
        pairs = [(eager.timed(b), compiled.timed(b)) for b in (batches[(offset + i) % 8] for i in range(args.steps))]
        eager_s.append(sum(e for e, _ in pairs) / args.steps)
        compiled_s.append(sum(c for _, c in pairs) / args.steps)
        print(f"run {run + 1}: eager {1e3 * eager_s[-1]:.1f} ms/step, compiled {1e3 * compiled_s[-1]:.1f} ms/step")
    e, c = statistics.median(eager_s), statistics.median(compiled_s)
    ratio = statistics.median(a / b for a, b in zip(eager_s, compiled_s, strict=True))
    print(
        f"{args.model} {args.model_kwargs} at {args.image_size} px, batch {args.batch_size}, {args.threads} torch "
        f"thread(s), {os.cpu_count()} CPUs, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"first-step loss: eager {eager_first:.6f}, compiled {compiled_first:.6f}")
    print(f"median: eager {1e3 * e:.1f} ms/step, compiled {1e3 * c:.1f} ms/step")
    print(f"INFO compile_seconds first_step={compile_s:.1f} warm_cache={warm_s:.1f} (excluded from the ratio)")
    print(f"RESULT train_step_compiled ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
