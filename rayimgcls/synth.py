"""The dataset generator: shapes on textured backgrounds, in the SambaStudio labels.csv format.

Nothing can be downloaded here, so tests, benchmarks and the demo make their data with this module. The
task is built to need the shape, not the colours: every class draws its fill and background colours from
the same distribution and every shape has the same area, so a colour histogram carries (almost) no class
information. Shapes are always lighter than their background, which gives a ViT trained from scratch an
edge it can find in a few hundred steps.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Ordered from most to least distinct at low resolution: the first `num_classes` are used.
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "arrow",
    "hexagon",
    "tee",
    "crescent",
)
SUBSETS: tuple[str, ...] = ("train", "validation", "test")
CSV_COLUMNS: tuple[str, ...] = ("image_path", "label", "subset", "metadata")

_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so edges are anti-aliased like a photo's


@dataclass(frozen=True)
class SynthConfig:
    num_images: int = 1000
    num_classes: int = 4
    min_size: int = 64
    max_size: int = 128
    multilabel: bool = False
    max_labels: int = 3
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    png_fraction: float = 0.25
    grayscale_fraction: float = 0.08
    rgba_fraction: float = 0.05
    exif_rotated_fraction: float = 0.03
    # A ViT trained from scratch on ~1000 images learns upright-ish shapes (+-20 degrees) in a minute of CPU
    # time; with full rotations it needs several times the data and epochs (measured while building this).
    max_rotation: float = 20.0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes={self.num_classes}: allowed 2..{len(SHAPES)}")
        if self.num_images < 3 * self.num_classes:
            raise ValueError(f"num_images={self.num_images}: need at least 3 per class ({3 * self.num_classes})")
        if not 16 <= self.min_size <= self.max_size:
            raise ValueError(f"image sizes {self.min_size}..{self.max_size}: need 16 <= min_size <= max_size")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError(f"split={self.split}: three non-negative ratios that sum to 1")


def shape_polygons(name: str) -> list[np.ndarray]:
    """Outline(s) of a unit-area shape centred on the origin; a second polygon is a hole (ring, crescent)."""

    def regular(n: int, phase: float = 0.0) -> np.ndarray:
        t = phase + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], axis=1)

    holes: list[np.ndarray] = []
    if name == "circle":
        outer = regular(64)
    elif name == "square":
        outer = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif name == "triangle":
        outer = regular(3, -math.pi / 2)
    elif name == "hexagon":
        outer = regular(6)
    elif name == "cross":
        a, b = 1.0, 0.34
        outer = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
        )
    elif name == "star":
        t = -math.pi / 2 + math.pi * np.arange(10) / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        outer = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == "ring":
        outer, holes = regular(64), [0.55 * regular(64)]
    elif name == "crescent":
        outer, holes = regular(64), [0.85 * regular(64) + np.array([0.45, 0.0])]
    elif name == "arrow":
        outer = np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.75], [1, 0], [0.2, 0.75], [0.2, 0.3], [-1, 0.3]])
    elif name == "tee":
        outer = np.array([[-1, -1], [1, -1], [1, -0.45], [0.3, -0.45], [0.3, 1], [-0.3, 1], [-0.3, -0.45], [-1, -0.45]])
    else:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    area = _polygon_area(outer) - sum(_polygon_area(h) for h in holes)
    if name == "crescent":  # the hole sticks out of the disc: measure the lit part on a grid instead
        area = _raster_area(outer, holes)
    scale = 1.0 / math.sqrt(area)
    return [outer * scale] + [h * scale for h in holes]


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _raster_area(outer: np.ndarray, holes: list[np.ndarray], n: int = 400) -> float:
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    to_px = lambda p: [tuple(v) for v in (p / 2.5 + 0.5) * n]  # noqa: E731 - local one-liner
    draw.polygon(to_px(outer), fill=255)
    for h in holes:
        draw.polygon(to_px(h), fill=0)
    return float((np.asarray(img) > 127).mean()) * 2.5**2


_LUMA = np.array([0.299, 0.587, 0.114])


def _colour(rng: np.random.Generator, luma_range: tuple[float, float]) -> np.ndarray:
    """A random RGB colour whose luma lies in `luma_range` (any hue, any saturation)."""
    for _ in range(1000):
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if luma_range[0] <= float(colour @ _LUMA) <= luma_range[1]:
            return colour
    raise AssertionError(f"no colour with luma in {luma_range}")  # unreachable for the ranges used here


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A textured RGB background: gradient, stripes, smooth noise or checks in two dark random colours.

    Backgrounds stay darker than every shape (luma <= 120 against >= 150): a consistent edge is what a small
    ViT trained from scratch on a few hundred images can find, while the hues are free, so colour says
    nothing about the class.
    """
    c1, c2 = _colour(rng, (0, 120)), _colour(rng, (0, 120))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    kind = rng.integers(4)
    if kind == 0:
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 1:
        period = rng.uniform(6, 20)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period)
    elif kind == 2:
        coarse = rng.random((rng.integers(3, 8), rng.integers(3, 8))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC)).clip(0, 1)
    else:
        cell = int(rng.integers(6, 18))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    t = t[..., None] * rng.uniform(0.3, 1.0)
    img = c1 * (1 - t) + c2 * t
    img += rng.normal(0, 5, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _draw_shape(
    img: Image.Image,
    rng: np.random.Generator,
    name: str,
    centre: tuple[float, float],
    radius: float,
    max_rotation: float,
) -> None:
    """Draw `name` turned by up to +-max_rotation degrees, with area radius**2, on `img` (supersampled)."""
    polys = shape_polygons(name)
    theta = rng.uniform(-1, 1) * math.radians(max_rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    span = int(math.ceil(radius * 2.6))
    box = (int(centre[0] - span / 2), int(centre[1] - span / 2))
    mask = Image.new("L", (span * _SUPERSAMPLE, span * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for i, poly in enumerate(polys):
        pts = (poly @ rot.T) * radius + np.array([centre[0] - box[0], centre[1] - box[1]])
        draw.polygon([tuple(p) for p in pts * _SUPERSAMPLE], fill=255 if i == 0 else 0)
    mask = mask.resize((span, span), Image.LANCZOS)
    colour = tuple(int(c) for c in _colour(rng, (150, 255)))
    img.paste(Image.new("RGB", (span, span), colour), box, mask)


def render_image(
    rng: np.random.Generator, labels: Sequence[int], size: tuple[int, int], max_rotation: float = 20.0
) -> Image.Image:
    """One image holding a shape per label, inside the central square so a centre crop keeps them all."""
    w, h = size
    img = Image.fromarray(_background(rng, w, h))
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    n = len(labels)
    # Several shapes go into distinct cells of a 2x2 grid so that none hides another; two shapes take a
    # diagonal pair of cells, where they can be drawn larger without touching.
    grid = 1 if n == 1 else 2
    if n == 2:
        cells, scale = ((0, 3), (1, 2))[int(rng.integers(2))], (0.44, 0.52)
    else:
        cells, scale = rng.permutation(grid * grid)[:n], (0.34, 0.44)
    cell = side / grid
    for label, c in zip(labels, cells, strict=True):
        radius = rng.uniform(*scale) * cell
        margin = min(radius * 1.15 + 0.05 * cell, cell / 2)  # no unit-area shape reaches past 1.15
        cx = x0 + (c % grid) * cell + rng.uniform(margin, cell - margin)
        cy = y0 + (c // grid) * cell + rng.uniform(margin, cell - margin)
        _draw_shape(img, rng, SHAPES[label], (cx, cy), radius, max_rotation)
    return img


def _encode(img: Image.Image, rng: np.random.Generator, cfg: SynthConfig) -> tuple[bytes, str, str]:
    """Encode in a random file form: JPEG or PNG, some grayscale, RGBA or EXIF-rotated. Returns bytes,
    extension and a metadata note."""
    roll = rng.random()
    buf = io.BytesIO()
    if roll < cfg.grayscale_fraction:
        img.convert("L").save(buf, "JPEG", quality=90)
        return buf.getvalue(), "jpg", "grayscale"
    roll -= cfg.grayscale_fraction
    if roll < cfg.rgba_fraction:
        rgba = img.convert("RGBA")
        alpha = np.full((img.height, img.width), 255, np.uint8)
        alpha[: img.height // 6] = 96  # a translucent band, composited over the decoder's background
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG")
        return buf.getvalue(), "png", "rgba"
    roll -= cfg.rgba_fraction
    if roll < cfg.exif_rotated_fraction:
        # Stored turned on its side with orientation 6: a viewer that honours EXIF shows `img` upright.
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif)
        return buf.getvalue(), "jpg", "exif-rotated"
    if rng.random() < cfg.png_fraction:
        img.save(buf, "PNG")
        return buf.getvalue(), "png", ""
    img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), "jpg", ""


def _assign_subsets(labels: list[list[int]], split: tuple[float, float, float], rng: np.random.Generator) -> list[str]:
    """Split each class (its first label) by the ratios, so every subset sees every class."""
    subsets = [""] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, ls in enumerate(labels):
        by_class.setdefault(ls[0], []).append(i)
    for idx in by_class.values():
        idx = list(rng.permutation(idx))
        n_val = max(1, round(split[1] * len(idx))) if split[1] > 0 else 0
        n_test = max(1, round(split[2] * len(idx))) if split[2] > 0 else 0
        for j, i in enumerate(idx):
            subsets[i] = "validation" if j < n_val else "test" if j < n_val + n_test else "train"
    return subsets


def make_dataset(out_dir: str | Path, cfg: SynthConfig = SynthConfig()) -> Path:
    """Render a dataset into `out_dir` (labels.csv, predictions.csv, class_to_idx.json, images/)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    labels: list[list[int]] = []
    for i in range(cfg.num_images):
        if cfg.multilabel:
            k = int(rng.integers(1, cfg.max_labels + 1))
            labels.append(sorted(int(x) for x in rng.choice(cfg.num_classes, size=k, replace=False)))
        else:
            labels.append([i % cfg.num_classes])  # balanced classes
    subsets = _assign_subsets(labels, cfg.split, rng)
    rows = []
    for i, (ls, subset) in enumerate(zip(labels, subsets, strict=True)):
        size = (int(rng.integers(cfg.min_size, cfg.max_size + 1)), int(rng.integers(cfg.min_size, cfg.max_size + 1)))
        data, ext, note = _encode(render_image(rng, ls, size, cfg.max_rotation), rng, cfg)
        rel = f"images/{i:06d}.{ext}"
        (out / rel).write_bytes(data)
        rows.append({"image_path": rel, "label": " ".join(map(str, ls)), "subset": subset, "metadata": note})
    _write_csv(out / "labels.csv", rows)
    _write_csv(out / "predictions.csv", [r for r in rows if r["subset"] == "test"])
    class_to_idx = {SHAPES[c]: c for c in range(cfg.num_classes)}
    (out / "class_to_idx.json").write_text(json.dumps(class_to_idx, indent=2) + "\n")
    return out


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def make_photo_jpegs(
    out_dir: str | Path, count: int, size: tuple[int, int], seed: int = 0, quality: int = 90
) -> list[Path]:
    """Photo-sized JPEGs (e.g. 500x375, 1600x1200) for the decode benchmarks; reuses existing files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"{i:06d}.jpg"
        if not path.exists():
            rng = np.random.default_rng([seed, i])  # per file, so a partial cache gives the same set
            render_image(rng, [i % len(SHAPES)], size).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths
