"""Ray Data pipelines over dataset.py and images.py: CSV rows -> decoded uint8 images, in parallel.

The CSV is parsed on the driver (it is small next to the images, and only there do we know each record's
line number), split into many blocks so decoding fans out over every CPU of the cluster, and decoded in Ray
Data tasks by the same `images.py` path that inference and serving use.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rayimgcls.dataset import Problem, image_failure, load_image
from rayimgcls.images import DEFAULT_MAX_PIXELS, Augment, PreprocessConfig
from rayimgcls.text import printable

ON_ERROR = ("raise", "keep")


class BadRowError(RuntimeError):
    """A row whose image cannot be used, raised inside a Ray Data task; the message names line and path."""


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode task needs (frozen and small: it travels to every task)."""

    data_root: str
    csv_name: str
    preprocess: PreprocessConfig
    augment: Augment | None = None  # None: the eval transform
    num_classes: int = 0  # 0: no label column in the output
    multilabel: bool = False
    on_error: str = "raise"  # "raise": fail naming the row; "keep": an `error` column, zero image

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r}: allowed {ON_ERROR}")


def decode_batch(batch: dict[str, np.ndarray], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Ray Data UDF: decode and transform each row's image; attach labels."""
    if spec.augment is not None:
        # Fresh entropy per batch: a reused worker process must not replay the same augmentations.
        random.seed(os.urandom(8))
    size = spec.preprocess.input_size
    images = np.zeros((len(batch["row"]), 3, size, size), dtype=np.uint8)
    errors = [""] * len(images)
    for i, (row, rel) in enumerate(zip(batch["row"], batch["image_path"], strict=True)):
        try:
            images[i] = load_image(spec.data_root, str(rel), spec.preprocess, spec.augment)
        except Exception as e:  # noqa: BLE001 - one file's failure, whatever it is, is its row's (image_failure)
            reason = image_failure(e)[1]
            if spec.on_error == "raise":
                raise BadRowError(
                    printable(f"{spec.csv_name}:{int(row)}: {rel}: {reason}")
                    + " (--skip-bad-rows skips such rows and records them)"
                ) from None
            errors[i] = reason
    out = {"row": np.asarray(batch["row"], dtype=np.int64), "image": images}
    if spec.num_classes:
        out["label"] = encode_labels(batch["labels"], spec.num_classes, spec.multilabel)
    if spec.on_error == "keep":
        out["image_path"] = np.asarray(batch["image_path"], dtype=object)
        out["error"] = np.asarray(errors, dtype=object)
    return out


def encode_labels(labels: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    """Lists of class ids -> class index (int64) or multi-hot (float32, num_classes wide)."""
    if not multilabel:
        return np.array([int(ls[0]) for ls in labels], dtype=np.int64)
    hot = np.zeros((len(labels), num_classes), dtype=np.float32)
    for i, ls in enumerate(labels):
        hot[i, np.asarray(ls, dtype=np.int64)] = 1.0
    return hot


def rows_dataset(df: pd.DataFrame, target_blocks_per_cpu: int = 4):
    """A Ray Dataset of CSV rows, split into enough blocks for every CPU to decode (one small CSV would
    otherwise be one block, decoded by one task)."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows_per_block = min(512, max(16, math.ceil(len(df) / (target_blocks_per_cpu * cpus))))
    ds = ray.data.from_pandas([df.iloc[i : i + rows_per_block] for i in range(0, len(df), rows_per_block)])
    # Ray Data reserves half of the CPUs per operator by default; with one decode operator that left one of
    # two CPUs idle most of the time (measured: 300 -> 440 images/s on 2 CPUs without it). This dataset's
    # own context only, so other pipelines of the process keep Ray's default.
    ds.context.op_resource_reservation_enabled = False
    return ds


def image_dataset(df: pd.DataFrame, spec: DecodeSpec, *, num_cpus: float = 1.0, shuffle_blocks: bool = False):
    """Rows (with `row`, `image_path` and, for labels, a `labels` column of id lists) -> decoded images.

    Output columns: `row`, `image` (uint8, 3 x S x S), `label` when spec.num_classes, and `image_path`,
    `error` when spec.on_error == "keep". Streaming: nothing is materialised unless the caller asks;
    `shuffle_blocks` randomises the order of row blocks on every pass (training epochs).
    """
    columns = ["row", "image_path"] + (["labels"] if spec.num_classes else [])
    rows = rows_dataset(df[columns])
    if shuffle_blocks:  # a new block order each epoch: cheap shuffling before the decode, not after
        rows = rows.randomize_block_order()
    return rows.map_batches(
        decode_batch, fn_kwargs={"spec": spec}, batch_size=64, num_cpus=num_cpus, batch_format="numpy"
    )


def _check_batch(batch: dict[str, np.ndarray], data_root: str, max_pixels: int) -> dict[str, np.ndarray]:
    from rayimgcls.dataset import check_image, path_problem

    # as dataset.check_images: a path check_rows already refuses (empty, a control character) is not opened
    results = [
        None if path_problem(str(p)) else check_image(data_root, str(p), max_pixels) for p in batch["image_path"]
    ]
    return {
        "row": batch["row"],
        "image_path": batch["image_path"],
        "code": np.asarray([r[0] if r else "" for r in results], dtype=object),
        "message": np.asarray([r[1] if r else "" for r in results], dtype=object),
    }


def check_images_on_ray(
    data_root: str, df: pd.DataFrame, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Problem]:
    """`dataset.check_images` spread over the Ray cluster: full decode of every image, every problem."""
    checked = (
        rows_dataset(df[["row", "image_path"]])
        .map_batches(
            _check_batch,
            fn_kwargs={"data_root": data_root, "max_pixels": max_pixels},
            batch_size=64,
            batch_format="numpy",
        )
        .to_pandas()
    )
    bad = checked[checked["code"] != ""].sort_values("row")
    return [Problem(name, int(r.row), r.message, r.code, r.image_path) for r in bad.itertuples()]
