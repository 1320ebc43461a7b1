"""InferConfig: batch inference into a result directory."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayimgcls import storage
from rayimgcls.config.base import PRECISIONS, check, opt, raise_if


@dataclass
class InferConfig:
    model_dir: str = opt("", "Model directory (model.safetensors + config.json), local or URI.")
    data_root: str = opt("", "Dataset root; image paths in the CSV are relative to it.")
    result_dir: str = opt("", "Where predictions-*.jsonl shards and manifest.json go.")
    csv: str = opt("predictions.csv", "CSV under data_root with an image_path column.")
    subset: str | None = opt(None, "Only rows of this subset (train, validation, test).")
    images: str | None = opt(
        None,
        "Predict a folder (recursively) or a glob such as 'images/**/*.jpg' "
        "instead of a CSV; relative to data_root when that is given.",
    )
    batch_size: int = opt(64, "Images per model call.")
    num_actors: int | None = opt(
        None, "Model actors; default the cluster's GPUs / gpus_per_actor with --use-gpu, else one per node."
    )
    use_gpu: bool = opt(False, "Run the model actors on GPUs (gpus_per_actor each).")
    gpus_per_actor: float | None = opt(
        None, "GPU share of each model actor with --use-gpu, 0 < x <= 1 (default 1; 0.5 packs two on a GPU)."
    )
    cpus_per_actor: float | None = opt(
        None, "CPUs each model actor reserves, the rest decode images; default 1 with --use-gpu, else 0.5."
    )
    threads_per_actor: int | None = opt(
        None, "Torch threads per model actor; default: the node's CPUs shared among its actors."
    )
    precision: str | None = opt(None, "fp32, bf16 or auto; default: the model directory's setting.")
    top_k: int = opt(5, "Classes listed in top_k (capped at the class count).")
    rows_per_shard: int = opt(10_000, "Input rows per predictions-NNNNN.jsonl shard.")
    max_pixels: int = opt(50_000_000, "Largest image in pixels (an error line beyond), checked before decoding.")
    merge: bool = opt(False, "Also write predictions.jsonl with every line.")
    overwrite: bool = opt(
        False, "Delete our earlier output in result_dir (shards, manifest, evaluation reports) first; other files stay."
    )
    resume: bool = opt(False, "Keep complete shards of the same model and input; compute the rest.")

    def __post_init__(self) -> None:
        errors = [
            check(self, "batch_size", self.batch_size >= 1, ">= 1"),
            check(self, "num_actors", self.num_actors is None or self.num_actors >= 1, ">= 1"),
            check(self, "cpus_per_actor", self.cpus_per_actor is None or self.cpus_per_actor > 0, "> 0"),
            check(self, "gpus_per_actor", self.gpus_per_actor is None or 0 < self.gpus_per_actor <= 1, "0 < x <= 1"),
            check(self, "threads_per_actor", self.threads_per_actor is None or self.threads_per_actor >= 1, ">= 1"),
            check(self, "precision", self.precision in (None, *PRECISIONS), " | ".join(PRECISIONS)),
            check(self, "top_k", self.top_k >= 1, ">= 1"),
            check(self, "rows_per_shard", self.rows_per_shard >= 1, ">= 1"),
            check(self, "max_pixels", self.max_pixels >= 1, ">= 1"),
            check(self, "subset", self.subset in (None, "train", "validation", "test"), "train | validation | test"),
        ]
        if self.overwrite and self.resume:
            errors.append("overwrite and resume: choose one")
        if self.images and self.subset:
            errors.append(f"subset={self.subset!r}: only with a CSV, not with images={self.images!r}")
        if self.gpus_per_actor is not None and not self.use_gpu:
            errors.append(f"gpus_per_actor={self.gpus_per_actor!r}: only with use_gpu")
        for name in ("model_dir", "result_dir"):
            if not getattr(self, name):
                errors.append(f"{name}: required")
        if not self.data_root and not self.images:
            errors.append("data_root: required (or --images DIR_OR_GLOB)")
        raise_if(errors, "inference")
        for name in ("model_dir", "data_root", "result_dir"):  # Ray workers may run in another directory
            value = getattr(self, name)
            if value and not storage.is_uri(value):
                setattr(self, name, os.path.abspath(os.path.expanduser(value)))
