"""Decode speed: JPEG files -> 224x224 uint8 three ways, with the same decode function on every side.

- loop: a single-process PIL loop (what a script does);
- DataLoader: torch's DataLoader with one worker process per core (what users pick today);
- Ray Data: rayimgcls's pipeline (`data.image_dataset`: rows split into blocks, decoded by Ray Data tasks).

All three call `images.preprocess` (decode with limits and EXIF, RGB, resize + centre crop) on the bytes of
each file. Two image sets: 500x375 (typical web photos) and 1600x1200 (camera-size), each decoded with and
without reduced JPEG decoding (PIL's `draft()`, which rayimgcls uses by default: the JPEG is decoded at
1/2, 1/4 or 1/8 scale as long as both sides stay >= twice the resize target). The pixel difference the
trick makes after the resize is printed too. A warm-up pass is excluded; each figure is the median of
--runs runs.

    python benchmarks/bench_decode.py                 # 1000 images per set, ~10 minutes on 2 cores
    python benchmarks/bench_decode.py --images 200 --runs 3
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rayimgcls.images import PreprocessConfig, decode_image, decode_min_side, preprocess, to_chw_uint8

PRE = PreprocessConfig(input_size=224, crop_pct=0.875, interpolation="bicubic")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="JPEGs per image set")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="500x375,1600x1200")
    p.add_argument("--workdir", default="/tmp/rayimgcls-bench-decode")
    return p.parse_args()


def full_decode(data: bytes) -> np.ndarray:
    """The same path as `images.preprocess`, with reduced JPEG decoding switched off."""
    return to_chw_uint8(decode_image(data, max_pixels=PRE.max_pixels), PRE)


def decode_file(path: str, reduced: bool) -> np.ndarray:
    data = Path(path).read_bytes()
    return preprocess(data, PRE) if reduced else full_decode(data)


def pil_loop(paths: list[str], reduced: bool) -> float:
    start = time.perf_counter()
    for p in paths:
        decode_file(p, reduced)
    return len(paths) / (time.perf_counter() - start)


class Files:
    """A map-style torch Dataset over the files (module level, so DataLoader workers can pickle it)."""

    def __init__(self, paths: list[str], reduced: bool) -> None:
        self.paths, self.reduced = paths, reduced

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_file(self.paths[i], self.reduced)


def dataloader(paths: list[str], reduced: bool) -> float:
    import torch.utils.data

    loader = torch.utils.data.DataLoader(
        Files(paths, reduced), batch_size=64, num_workers=os.cpu_count(), persistent_workers=False
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - start)


def ray_data(root: str, rows, reduced: bool) -> float:
    from rayimgcls.data import DecodeSpec, image_dataset, rows_dataset

    if reduced:  # rayimgcls's pipeline exactly as training and inference run it
        ds = image_dataset(rows, DecodeSpec(root, "labels.csv", PRE))
    else:  # the same blocks and tasks, with reduced decoding switched off in the decode function
        ds = rows_dataset(rows).map_batches(_full_decode_batch, fn_kwargs={"root": root}, batch_size=64)
    start = time.perf_counter()
    for _ in ds.iter_batches(batch_size=64, batch_format="numpy"):
        pass
    return len(rows) / (time.perf_counter() - start)


def _full_decode_batch(batch: dict, root: str) -> dict:
    images = np.stack([decode_file(os.path.join(root, str(p)), False) for p in batch["image_path"]])
    return {"row": batch["row"], "image": images}


def median_rate(fn: Callable[[], float], runs: int) -> float:
    fn()  # warm-up: worker processes start, files enter the page cache
    return statistics.median(fn() for _ in range(runs))


def image_set(args: argparse.Namespace, size: str) -> tuple[str, list[str]]:
    from rayimgcls.synth import make_photo_jpegs

    width, height = (int(x) for x in size.split("x"))
    root = Path(args.workdir) / size
    paths = make_photo_jpegs(root / "images", args.images, (width, height))
    (root / "labels.csv").write_text("image_path,label,subset\n" + "".join(f"images/{p.name},0,train\n" for p in paths))
    return str(root), [str(p) for p in paths]


def pixel_difference(paths: list[str]) -> float:
    """Mean absolute difference (grey levels) between reduced and full decoding after the resize."""
    diffs = [np.abs(decode_file(p, True).astype(int) - decode_file(p, False).astype(int)).mean() for p in paths]
    return float(np.mean(diffs))


def main() -> None:
    import ray

    from rayimgcls.dataset import read_csv

    args = parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(logging_level="ERROR")
    results = []
    for size in args.sizes.split(","):
        root, paths = image_set(args, size)
        rows = read_csv(root)
        width = int(size.split("x")[0])
        reduces = decode_image(Path(paths[0]).read_bytes(), min_side=decode_min_side(PRE)).size[0] < width
        for reduced in (False, True):
            rates = {
                "loop": median_rate(functools.partial(pil_loop, paths, reduced), args.runs),
                "dataloader": median_rate(functools.partial(dataloader, paths, reduced), args.runs),
                "ray": median_rate(functools.partial(ray_data, root, rows, reduced), args.runs),
            }
            results.append((size, reduced, rates))
            print(
                f"{size} {'reduced' if reduced else 'full   '} decode: PIL loop {rates['loop']:.0f} img/s, "
                f"DataLoader({os.cpu_count()} workers) {rates['dataloader']:.0f} img/s, Ray Data "
                f"{rates['ray']:.0f} img/s",
                flush=True,
            )
        print(
            f"{size}: reduced decoding {'applies' if reduces else 'does not apply (too small)'}; mean pixel "
            f"difference after the resize {pixel_difference(paths[:50]):.2f} grey levels",
            flush=True,
        )
    ray.shutdown()
    print(
        f"{args.images} JPEGs per set, median of {args.runs}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for size, reduced, r in results:
        if reduced:  # the default path
            tag = size.replace("x", "_")
            print(f"RESULT decode_{tag}_ray_vs_loop ratio={r['ray'] / r['loop']:.2f} target=1.8")
            print(f"RESULT decode_{tag}_ray_vs_dataloader ratio={r['ray'] / r['dataloader']:.2f} target=1.0")
    for size in args.sizes.split(","):
        full = next(r for s, red, r in results if s == size and not red)
        fast = next(r for s, red, r in results if s == size and red)
        print(
            f"RESULT decode_{size.replace('x', '_')}_draft_speedup ratio={fast['loop'] / full['loop']:.2f} "
            "target=informational"
        )


if __name__ == "__main__":
    main()
