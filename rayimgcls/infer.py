"""Ray Data batch inference -> sharded JSON Lines (DESIGN §5).

Rows are read on the driver (only there is each record's CSV line known), decoded to uint8 by Ray Data CPU
tasks (`data.image_dataset`), and run through `Predictor` in an actor pool that also formats each line, so
the driver only routes finished strings into shards (rayimgcls.results: the result directory's format, the
shard plan, the writer and the resume checks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rayimgcls import console, storage, telemetry
from rayimgcls.card import ModelCard
from rayimgcls.config import InferConfig
from rayimgcls.dataset import IMAGE_EXTENSIONS, DatasetError, Problem, read_csv, rows_fingerprint
from rayimgcls.images import PreprocessConfig
from rayimgcls.model import check_model_dir
from rayimgcls.results import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_GLOB,
    PipelineError,
    Shard,
    ShardWriter,
    check_complete,
    error_line,
    merge_shards,
    plan_shards,
    prediction_line,
    prepare_result_dir,
    write_manifest,
)

logger = logging.getLogger(__name__)

CPU_ACTOR_CPUS = 0.5  # see plan_pool
ERROR_EXAMPLES = 5  # error lines the summary shows


# ---------------------------------------------------------------------------------------------------------
# Inputs: a CSV (by default predictions.csv) or a folder / glob of images.


@dataclass(frozen=True)
class Inputs:
    """The rows to predict (`row`, `image_path`), the root their paths are relative to, and the manifest's
    description of them (which also decides whether a result dir can be resumed)."""

    frame: pd.DataFrame
    data_root: str
    description: dict


def read_inputs(cfg: InferConfig) -> Inputs:
    if cfg.images:
        return _image_inputs(cfg.images, cfg.data_root)
    required = ("image_path", "subset") if cfg.subset else ("image_path",)
    df = read_csv(cfg.data_root, cfg.csv, required)
    if cfg.subset:
        df = df[df["subset"] == cfg.subset]
        if df.empty:
            problem = Problem(cfg.csv, None, f"no rows with subset {cfg.subset!r}", "empty_subset")
            raise DatasetError([problem])
    # The labels' fingerprint lets evaluate say when it scores against labels edited since inference.
    labels = {"labels_sha256": rows_fingerprint(df["row"], df["label"])}
    return _inputs(
        df[["row", "image_path"]].reset_index(drop=True),
        cfg.data_root,
        {"kind": "csv", "data_root": cfg.data_root, "csv": cfg.csv, "subset": cfg.subset, **labels},
    )


def _inputs(frame: pd.DataFrame, root: str, description: dict) -> Inputs:
    """`sha256` fingerprints the (line, image_path) rows predicted: resume and evaluate compare it."""
    fingerprint = rows_fingerprint(frame["row"], frame["image_path"])
    return Inputs(frame, root, {**description, "rows": len(frame), "sha256": fingerprint})


def _image_inputs(pattern: str, data_root: str) -> Inputs:
    """Every image file in a folder (recursively, by extension) or every file a glob matches, sorted.
    `row` is the 1-based position in that list; `input` the path relative to data_root (when given, and a
    relative pattern is taken inside it) or else to the folder / the glob's fixed prefix."""
    if data_root and not storage.is_uri(pattern) and not pattern.startswith("/"):
        pattern = storage.join(data_root, pattern)
    base, glob = _split_glob(pattern)
    if glob:
        regex = glob_regex(glob)
        found = [p for p in storage.walk_files(base) if regex.match(p)]
    else:
        found = [p for p in storage.walk_files(base) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        what = "files matching" if glob else f"images ({', '.join(IMAGE_EXTENSIONS)}) in"
        raise DatasetError([Problem("--images", None, f"no {what} {pattern}", "no_images")])
    root = data_root or base
    prefix = _relative_prefix(root, base)
    frame = pd.DataFrame({"row": np.arange(1, len(found) + 1), "image_path": [prefix + p for p in found]})
    return _inputs(frame, root, {"kind": "images", "data_root": root, "images": pattern})


def _split_glob(pattern: str) -> tuple[str, str]:
    """'data/images/**/*.jpg' -> ('data/images', '**/*.jpg'); a plain folder -> (folder, '')."""
    parts = pattern.rstrip("/").split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    return "/".join(parts[:fixed]) or ".", "/".join(parts[fixed:])


def _relative_prefix(root: str, base: str) -> str:
    """The path from `root` down to `base` ('' when equal), refusing a base outside root."""
    local = not storage.is_uri(root)
    root_n, base_n = (os.path.abspath(p) if local else p.rstrip("/") for p in (root, base))
    if base_n == root_n:
        return ""
    if not base_n.startswith(root_n.rstrip("/") + "/"):
        problem = Problem("--images", None, f"{base} lies outside the data root {root}", "path_escape")
        raise DatasetError([problem])
    return base_n[len(root_n.rstrip("/")) + 1 :] + "/"


def glob_regex(glob: str) -> re.Pattern[str]:
    """A shell glob over '/'-separated relative paths: `*`, `?` and `[...]` stay inside one folder, `**/`
    spans any number of folders (including none)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] in "*?":
            out.append("[^/]*" if glob[i] == "*" else "[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) > 0:
            body = glob[i + 1 : end]
            out.append("[" + ("^" + re.escape(body[1:]) if body[0] == "!" else re.escape(body)) + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


# ---------------------------------------------------------------------------------------------------------
# Shards and the manifest


def effective_preprocess(cfg: InferConfig, card: ModelCard) -> PreprocessConfig:
    """The model's preprocessing, its pixel limit never above this run's --max-pixels."""
    return dataclasses.replace(card.preprocess, max_pixels=min(card.preprocess.max_pixels, cfg.max_pixels))


def build_manifest(cfg: InferConfig, card: ModelCard, inputs: Inputs, shards: list[Shard]) -> dict:
    """What the shards were computed from; `manifest_differences` compares it with a stored one, so
    `--resume` keeps shards only when they would come out the same: the weights' version, and also the
    kwargs and preprocessing config.json rebuilds them with (either changes every probability)."""
    return {
        "format": FORMAT_VERSION,
        "model": {
            "dir": cfg.model_dir,
            "name": card.model_name,
            "version": card.version,
            "kwargs": card.model_kwargs,
            "preprocess": effective_preprocess(cfg, card).to_dict(),
            "num_classes": card.num_classes,
            "multilabel": card.multilabel,
            "class_names": card.class_names,
            "thresholds": card.thresholds,
        },
        "input": inputs.description,
        "settings": {
            "precision": cfg.precision or card.precision,
            "top_k": cfg.top_k,
            "rows_per_shard": cfg.rows_per_shard,
        },
        "shards": [{"file": s.file, **asdict(s)} for s in shards],
        "complete": False,
    }


# ---------------------------------------------------------------------------------------------------------
# The model stage


class PredictLines:
    """Ray Data actor: decoded uint8 rows -> finished JSON lines. The model runs once per batch on the rows
    that decoded; the others become error lines, so no row is ever dropped."""

    def __init__(self, model_dir: str, device: str, precision: str | None, top_k: int, threads: int) -> None:
        import torch

        from rayimgcls.model import Predictor

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the reserved CPUs; see plan_pool
        self.predictor = Predictor.from_dir(model_dir, device=device, precision=precision)
        self.top_k = top_k
        logger.info(
            "model actor ready: %s on %s, precision %s, %d threads",
            self.predictor.card.model_name,
            device,
            self.predictor.precision,
            threads,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors, rows, paths = batch["error"], batch["row"], batch["image_path"]
        ok = np.flatnonzero(errors == "")
        lines = np.empty(len(rows), dtype=object)
        if len(ok):
            probs = self.predictor.predict_batch(batch["image"][ok])
            card = self.predictor.card
            for i, p in zip(ok, probs, strict=True):
                lines[i] = prediction_line(str(paths[i]), int(rows[i]), p, card, self.top_k)
        for i in np.flatnonzero(errors != ""):
            lines[i] = error_line(str(paths[i]), int(rows[i]), str(errors[i]))
        return {"row": np.asarray(rows, dtype=np.int64), "line": lines, "failed": errors != ""}


@dataclass(frozen=True)
class PoolPlan:
    """How the model stage is spread: actors, what each reserves, its torch threads, and the CPUs of a decode
    task."""

    actors: int
    cpus: float
    gpus: float
    threads: int
    decode_cpus: float = 1.0


def plan_pool(cfg: InferConfig) -> PoolPlan:
    """The pool for the cluster Ray is connected to; see size_pool."""

    from rayimgcls.runtime import check_resources, max_resources, node_cpus

    nodes = node_cpus()
    most = max_resources()  # an autoscaling cluster's maximum where it says it: an actor per GPU it can have
    pool = size_pool(cfg, nodes, gpus=most.get("GPU", 0.0), max_cpus=most.get("CPU", 0.0))
    check_resources("inference", cpus=pool.actors * pool.cpus, gpus=pool.actors * pool.gpus)
    return pool


def size_pool(cfg: InferConfig, nodes: list[float], gpus: float, max_cpus: float) -> PoolPlan:
    """With --use-gpu, as many actors as the cluster's GPUs hold at `gpus_per_actor` each (1: one per GPU;
    0.5: two share each GPU, which pays when one actor leaves the GPU idle between batches). On CPUs, by
    default one actor per node whose torch threads use all the node's cores while it reserves only
    CPU_ACTOR_CPUS. A matmul-bound model gains nothing from a second process on the same cores; the
    reservation only decides how many decode tasks run beside it. It must differ from a decode task's 1 CPU:
    with equal resource requests Ray Data fuses the decode into the actor (ray issue #54433), which
    serialises decoding with the model.

    Decoding must still find a CPU, or the pipeline waits forever: a CPU actor goes only on a node with room for
    a decode task beside it (nodes of one CPU decode), and on a lone one-CPU machine the decode tasks take the
    half CPU the actor leaves. `nodes`: the CPUs of each node now; `max_cpus`: what the cluster can scale to.
    """
    from rayimgcls.runtime import ResourceError

    cpus = cfg.cpus_per_actor or (1.0 if cfg.use_gpu else CPU_ACTOR_CPUS)
    gpu_share = (cfg.gpus_per_actor or 1.0) if cfg.use_gpu else 0.0
    roomy = [c for c in nodes if c >= cpus + 1.0]
    per_gpus = max(math.floor(gpus / gpu_share + 1e-9), 1) if cfg.use_gpu else 0  # 1e-9: 0.3 / 0.1 is 2.999...
    actors = cfg.num_actors or (per_gpus if cfg.use_gpu else max(len(roomy), 1))
    decode_cpus = min(1.0, max_cpus - actors * cpus)
    if decode_cpus <= 0:
        raise ResourceError(
            f"inference: {actors} model actor(s) of {cpus:g} CPU leave none of the cluster's "
            f"{max_cpus:g} CPUs to decode images with; use fewer --num-actors or --cpus-per-actor"
        )
    per_node = math.ceil(actors / max(len(roomy) or len(nodes), 1))
    threads = cfg.threads_per_actor or max(1, int(max(nodes, default=1)) // per_node)
    return PoolPlan(actors, cpus, gpu_share, threads, decode_cpus)


def predictions_dataset(frame: pd.DataFrame, data_root: str, card: ModelCard, cfg: InferConfig, pool: PoolPlan) -> Any:
    """Rows -> Ray Dataset of (`row`, `line`, `failed`): decode tasks, then the model actor pool."""
    import ray

    from rayimgcls.data import DecodeSpec, image_dataset

    spec = DecodeSpec(data_root, cfg.images or cfg.csv, effective_preprocess(cfg, card), on_error="keep")
    return image_dataset(frame, spec, num_cpus=pool.decode_cpus).map_batches(
        PredictLines,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        fn_constructor_kwargs={
            "model_dir": cfg.model_dir,
            "device": "cuda" if cfg.use_gpu else "cpu",
            "precision": cfg.precision,
            "top_k": cfg.top_k,
            "threads": pool.threads,
        },
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
    )


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class InferSummary:
    """What a run did; printed by the CLI and stored in the manifest."""

    result_dir: str
    rows: int  # input rows in all
    computed: int  # rows predicted by this run (the rest were in kept shards)
    lines: int  # lines this run wrote
    errors: int  # error lines among them
    shards_written: int
    shards_kept: int
    seconds: float  # the pipeline's wall time (Ray's start excluded)
    startup_seconds: float = 0.0  # until the first lines came back: actor start, model load, first batch
    first_lines: int = 0  # lines in that first batch
    merged: str | None = None
    error_examples: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """The rate once the model actors run: what a long job approaches, start-up being a fixed cost
        (the plain rate when everything came back in one batch)."""
        if self.computed <= self.first_lines:
            return self.images_per_s
        return (self.computed - self.first_lines) / (self.seconds - self.startup_seconds)

    def record(self, lines: np.ndarray, failed: np.ndarray, shards: int, elapsed: float) -> None:
        """Count one batch of lines from the pipeline (`elapsed`: seconds since it started)."""
        if not self.first_lines:
            self.startup_seconds, self.first_lines = elapsed, len(lines)
        self.lines += len(lines)
        self.errors += int(failed.sum())
        self.error_examples += [str(x) for x in lines[failed]][: ERROR_EXAMPLES - len(self.error_examples)]
        self.shards_written += shards

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "images_per_s": round(self.images_per_s, 2),
            "steady_images_per_s": round(self.steady_images_per_s, 2),
        }

    def describe(self) -> str:
        """The final summary the CLI prints."""
        kept = f", {self.shards_kept} complete shard(s) kept from the earlier run" if self.shards_kept else ""
        out = [
            f"{self.rows} rows in: {self.computed} predicted -> {self.lines} lines ({self.errors} errors) "
            f"in {self.shards_written} shard(s){kept}"
        ]
        if self.computed:
            out.append(f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s")
        if self.computed > self.first_lines:
            out[-1] += (
                f" ({self.steady_images_per_s:.1f} images/s after the first "
                f"{self.startup_seconds:.1f} s of model start-up)"
            )
        out.append(
            f"results: {storage.join(self.result_dir, SHARD_GLOB)} and {MANIFEST}"
            + (f", merged into {self.merged}" if self.merged else "")
        )
        out += [f"  error line: {line}" for line in self.error_examples]
        return "\n".join(out)


class Progress:
    """Rows done of total, shards, errors, images/s and ETA on the driver (rayimgcls.console.RowsDisplay)."""

    def __init__(self, total: int, shards: int) -> None:
        from rayimgcls.console import RowsDisplay

        self.start = time.perf_counter()
        self.display = RowsDisplay(total, shards)

    def update(self, summary: InferSummary, written: list[Shard]) -> None:
        self.display.update(summary.lines, summary.shards_written + summary.shards_kept, summary.errors)

    def close(self) -> None:
        self.display.close()


def run_inference(cfg: InferConfig, address: str | None = None) -> InferSummary:
    """Predict every input row into `cfg.result_dir` (see the module docstring); returns the summary."""
    from rayimgcls.runtime import check_address, init_ray

    check_address(address)  # before the result dir is touched
    card = check_model_dir(cfg.model_dir)
    inputs = read_inputs(cfg)
    rows = inputs.frame["row"].to_numpy()
    shards = plan_shards(rows, cfg.rows_per_shard)
    manifest = build_manifest(cfg, card, inputs, shards)
    keep = prepare_result_dir(cfg, manifest, rows)
    storage.makedirs(cfg.result_dir)
    write_manifest(cfg.result_dir, manifest)
    todo = [s for s in shards if s.index not in keep]
    if keep:
        logger.info("resuming: %d of %d shards already complete", len(keep), len(shards))
    summary = InferSummary(
        cfg.result_dir,
        len(rows),
        computed=sum(s.stop - s.start for s in todo),
        lines=0,
        errors=0,
        shards_written=0,
        shards_kept=len(keep),
        seconds=0.0,
    )
    if todo:
        init_ray(address)
        start = time.perf_counter()  # Ray's own start-up is not the pipeline's speed
        frame = pd.concat([inputs.frame.iloc[s.start : s.stop] for s in todo], ignore_index=True)
        with console.ray_log(cfg.result_dir):
            _predict_into(frame, inputs, card, cfg, shards, rows, summary)
        summary.seconds = time.perf_counter() - start
    check_complete(cfg.result_dir, shards)
    if cfg.merge:
        summary.merged = merge_shards(cfg.result_dir, manifest["shards"])
    manifest.update(complete=True, summary=summary.to_dict())
    write_manifest(cfg.result_dir, manifest)
    return summary


def _predict_into(
    frame: pd.DataFrame,
    inputs: Inputs,
    card: ModelCard,
    cfg: InferConfig,
    shards: list[Shard],
    rows: np.ndarray,
    summary: InferSummary,
) -> None:
    import ray

    pool = plan_pool(cfg)
    logger.info(
        "predicting %d rows with %d model actor(s) (%g CPU, %g GPU, %d threads each), batch size %d",
        len(frame),
        pool.actors,
        pool.cpus,
        pool.gpus,
        pool.threads,
        cfg.batch_size,
    )
    writer = ShardWriter(cfg.result_dir, shards, rows, cfg.rows_per_shard)
    progress = Progress(len(frame), len(shards))
    run = telemetry.infer_run_id(cfg.result_dir, inputs.description["sha256"], card.version)
    logger.info("metrics label run=%s", run)
    ds = predictions_dataset(frame, inputs.data_root, card, cfg, pool)
    try:
        # prefetch_batches=0: with prefetching the iterator holds each block back until the next one
        # arrives, which delays every shard (and the progress) by a whole model batch.
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            written = writer.add(batch["row"], batch["line"])
            summary.record(batch["line"], batch["failed"], len(written), time.perf_counter() - progress.start)
            progress.update(summary, written)
            errors = [json.loads(line)["error"] for line in batch["line"][batch["failed"]]]
            rate = summary.lines / (time.perf_counter() - progress.start)
            telemetry.infer_progress(run, len(batch["line"]), errors, len(written), rate)
    except ray.exceptions.RayError as e:
        last = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        raise PipelineError(
            f"inference stopped after {summary.shards_written} shards ({last.strip()}); "
            "complete shards are kept: fix the cause and re-run with --resume"
        ) from None
    finally:
        progress.close()
