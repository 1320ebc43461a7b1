"""Bytes -> RGB uint8 -> model input: the one preprocessing path of rayimgcls.

Training's evaluation, batch inference, Serve and the Python API all call `preprocess` (decode + the
transform built from the model directory's preprocessing config), so one file gives one array everywhere.
Transforms stop at uint8 CHW (timm's "prefetcher" form): Ray's object store carries 4x less than float32,
and `normalize` runs on the model's device. This module imports neither torch nor timm, so the Ray Data
decode tasks that import it start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel photo is fine; a 20000x20000 "bomb" is not
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white, as a browser shows them

# Magic numbers of the formats we accept. Sniffing the bytes (not trusting a name or a Content-Type) also
# keeps PIL's riskier plugins (EPS runs Ghostscript) out of reach.
_SIGNATURES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("JPEG", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("PNG", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("WEBP", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("GIF", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("BMP", lambda b: b[:2] == b"BM"),
    ("TIFF", lambda b: b[:4] in (b"II*\x00", b"MM\x00*")),
)
ACCEPTED_FORMATS: tuple[str, ...] = tuple(name for name, _ in _SIGNATURES)
MEDIA_TYPES: dict[str, str] = {f"image/{n.lower()}": n for n in ACCEPTED_FORMATS} | {"image/jpg": "JPEG"}

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey picture


class ImageError(ValueError):
    """An input that is not a usable image. `code` is the stable reason clients and CSV reports see."""

    def __init__(self, message: str, code: str = "undecodable") -> None:
        super().__init__(message)
        self.code = code  # "empty", "unsupported_format", "undecodable", "truncated" or "too_many_pixels"


def sniff_format(data: bytes) -> str | None:
    """The accepted format the bytes start with, or None."""
    return next((name for name, matches in _SIGNATURES if matches(data)), None)


def _open(data: bytes) -> tuple[Image.Image, str]:
    """PIL's lazy open of sniffed bytes: reads the header only."""
    if not data:
        raise ImageError("empty image: zero bytes", "empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            f"not a supported image format (accepted: {', '.join(ACCEPTED_FORMATS)})", "unsupported_format"
        )
    with _as_image_error(fmt), warnings.catch_warnings():
        # Our own pixel limit replaces PIL's bomb warning, and PIL's warnings about corrupt metadata would only
        # be noise in a worker's log: the file either decodes (and is used) or raises (and is reported).
        warnings.simplefilter("ignore")
        return Image.open(io.BytesIO(data), formats=[fmt]), fmt


def image_pixels(data: bytes) -> int:
    """width x height from the header alone (no pixel is decoded): what a request's pixel budget counts."""
    img, _ = _open(data)
    return img.size[0] * img.size[1]


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image.

    The pixel count is checked from the header before any pixel is decoded (decompression bombs); the
    decode is complete (a truncated file fails here, unlike `verify()`); EXIF orientation is applied; every
    PIL mode becomes three-channel RGB (see `to_rgb`). With `min_side`, a JPEG is decoded at the largest
    DCT reduction (1/2, 1/4, 1/8) whose both sides stay >= min_side: several times faster on camera-size
    files, and the caller's resize still sees a larger picture than it produces. Whatever goes wrong with the
    bytes is an ImageError, so one bad file never fails more than its own row or request.
    """
    img, fmt = _open(data)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}", "too_many_pixels"
        )
    with _as_image_error(fmt), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in _open
        if min_side is not None and fmt == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


@contextlib.contextmanager
def _as_image_error(fmt: str) -> Iterator[None]:
    """Every exception PIL raises on a client's bytes becomes an ImageError with a stable code.

    Corrupt files surface as OSError, SyntaxError, EOFError or ValueError, but also as struct.error,
    OverflowError, IndexError or MemoryError from inside a plugin; they all mean "these bytes are not
    pixels", which is the file's problem (a 4xx, an error line), not ours (a 500, a failed job).
    """
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(str(e), "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode {fmt}: the file starts like one but its header is corrupt") from None
    except MemoryError:
        raise ImageError(f"cannot decode {fmt}: it needs more memory than this process has") from None
    except Exception as e:  # noqa: BLE001 - see the docstring: any failure inside PIL is the file's
        code = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "undecodable"
        raise ImageError(f"cannot decode {fmt}: {e or type(e).__name__}", code) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB uint8.

    Transparency (RGBA, LA, PA, P with a transparent colour) is composited over ALPHA_BACKGROUND; 16-bit
    ("I;16*") and 32-bit integer ("I") images are scaled from 0..65535 to 0..255 unless they already fit in
    8 bits; float ("F") images are read as 0..1 when they fit, else clipped to 0..255; 1-bit, L, CMYK, YCbCr
    and the rest go through PIL's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if img.mode == "F" and peak <= 1.0:
            values = values * 255.0
        elif img.mode != "F" and (img.mode.startswith("I;16") or peak > 255):
            values = values / 257.0
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert PIL mode {img.mode} to RGB: {e}", "undecodable") from None


# What a model directory's config.json may hold (card.py checks it; TrainConfig should accept no more). timm's
# pretrained configs span mean 0..0.5, std 0.143..1 and crop_pct 0.875..1 (volo_*_448: 1.15, outside our
# 0 < x <= 1). Beyond these ranges a mean overflowed the border fill (round(255 * 1e308)), and crop_pct sets the
# eval resize to size / crop_pct: below 1/4 that is over 16 crops' worth of pixels for no model's benefit.
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-12, 1.0)
CROP_PCT_RANGE = (0.25, 1.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its input; stored in the model directory's config.json."""

    input_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_model(cls, model: torch.nn.Module, image_size: int) -> PreprocessConfig:
        """Resolve timm's data config for `model` at `image_size` (timm would report 224 for a model built
        with img_size=32, so the size is passed in explicitly)."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
        return cls(
            input_size=image_size,
            interpolation=cfg["interpolation"],
            crop_pct=float(cfg["crop_pct"]),
            crop_mode=cfg.get("crop_mode", "center"),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def resize_side(self) -> int:
        """The shorter side the eval transform resizes to before its centre crop."""
        return math.floor(self.input_size / self.crop_pct)


Transform = Callable[[Image.Image], np.ndarray]
FULL_RESIZE_AREA = 64  # see resize_and_crop: up to 64 crops' worth of pixels, the resize is timm's to the pixel

_INTERPOLATION = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


def _interpolation(name: str) -> int:
    if not isinstance(name, str) or name not in _INTERPOLATION:  # a list is unhashable: name it, not TypeError
        raise ValueError(f"interpolation {name!r}: allowed {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def to_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def center_crop_box(width: int, height: int, resized: tuple[int, int], size: int) -> tuple[float, ...]:
    """The region of a (width, height) image that torchvision's Resize(resized) + CenterCrop(size) keeps, in
    the source's coordinates: (left, top, right, bottom)."""
    new_w, new_h = resized
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return source_box(width, height, resized, (left, top, left + size, top + size))


def source_box(width: int, height: int, resized: tuple[int, int], box: tuple[int, ...]) -> tuple[float, ...]:
    """A (left, top, right, bottom) box of the (width, height) image resized to `resized`, in the source's
    coordinates: what PIL's `resize(box=...)` takes to compute only that region."""
    sx, sy = width / resized[0], height / resized[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def resized_shorter(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) torchvision's Resize(int) gives: shorter side -> `size`, aspect kept."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_and_crop(img: Image.Image, resized: tuple[int, int], size: int, resample: int) -> Image.Image:
    """Resize to `resized`, then centre crop `size` x `size`, with memory bounded by the crop, whatever the shape.

    Ordinary shapes (the resized image at most FULL_RESIZE_AREA crops) are resized whole and cropped, exactly
    as timm does. Beyond that only the kept region is computed, with PIL's `resize(box=...)`: it samples the
    source at the same positions with the same filter (reading pixels just outside the box, as the full resize
    does), equal to the full resize up to float rounding (a grey level on a few pixels), but with the work and
    memory of the crop: a 1 x 40,000,000 image would otherwise be resized to 36 x 1.4 billion pixels first.
    """
    if resized[0] * resized[1] <= FULL_RESIZE_AREA * size * size:
        return center_crop(img.resize(resized, resample), size)
    return img.resize((size, size), resample, box=center_crop_box(*img.size, resized, size))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop for an image at least `size` on both sides."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def fitted(width: int, height: int, side: int) -> tuple[int, int]:
    """The (width, height) that fits a `side` x `side` square with the aspect kept (the longer side -> `side`)."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_and_pad(img: Image.Image, side: int, size: int, resample: int, fill: tuple[int, int, int]) -> Image.Image:
    """`border`'s geometry: the longer side fitted to `side`, then centred on a `size` x `size` canvas of `fill`
    (a side longer than `size` centre-cropped), with memory bounded by the canvas, as resize_and_crop: beyond
    FULL_RESIZE_AREA canvases (side = size / crop_pct, so a small crop_pct) only the part the canvas keeps is
    resized, from the same source region (equal up to float rounding)."""
    resized = fitted(*img.size, side)
    if resized[0] * resized[1] <= FULL_RESIZE_AREA * size * size:
        return pad_to_square(img.resize(resized, resample), size, fill)
    # pad_to_square pastes at (size - w) // 2: a negative offset crops -offset pixels from the left (top)
    left, top = (max(0, -((size - n) // 2)) for n in resized)
    kept = min(resized[0], size), min(resized[1], size)
    box = source_box(*img.size, resized, (left, top, left + kept[0], top + kept[1]))
    return pad_to_square(img.resize(kept, resample, box=box), size, fill)


def pad_to_square(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `img` on a `size` x `size` canvas of `fill` (a side longer than `size` is centre-cropped)."""
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return canvas


def mean_fill(pre: PreprocessConfig) -> tuple[int, int, int]:
    """The padding colour of `border`: the normalisation mean, which normalises to zero (as timm pads). Clamped to
    0..255 (NaN: 0), so no mean can overflow it (round(255 * 1e308) raised OverflowError inside Ray)."""
    return tuple(0 if math.isnan(m) else round(255 * min(max(m, 0.0), 1.0)) for m in pre.mean)  # type: ignore[return-value]


def eval_transform(pre: PreprocessConfig) -> Transform:
    """Resize + centre crop -> uint8 (3, S, S): timm's eval transform (same geometry, same PIL resampling)
    without the normalisation, in plain PIL so decode tasks need not import torch. `center` resizes the
    shorter side to `resize_side`; `squash` resizes both sides to it (the aspect ratio is not kept); `border`
    fits the longer side to it and pads the shorter with the mean colour (timm's ResizeKeepRatio +
    CenterCropOrPad). Each computes at most a few crops' worth of pixels, whatever the image's shape and
    crop_pct."""
    resample, side, size = _interpolation(pre.interpolation), pre.resize_side, pre.input_size
    if pre.crop_mode == "center":
        return lambda img: to_chw(resize_and_crop(img, resized_shorter(*img.size, side), size, resample))
    if pre.crop_mode == "squash":
        return lambda img: to_chw(resize_and_crop(img, (side, side), size, resample))
    if pre.crop_mode == "border":
        fill = mean_fill(pre)
        return lambda img: to_chw(fit_and_pad(img, side, size, resample, fill))
    raise ValueError(f"crop_mode {pre.crop_mode!r}: supported are center, squash and border")


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation switches."""

    random_resized_crop: bool = True
    crop_scale_min: float = 0.08
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    randaugment: str | None = None  # timm's spec, e.g. "rand-m9-mstd0.5-inc1"


class TrainTransform:
    """Random resized crop (timm's algorithm), flips, colour jitter and optionally timm's RandAugment ->
    uint8 (3, S, S). Plain PIL and Python's `random` (which the caller seeds), so decode tasks stay light;
    timm is imported only when RandAugment is asked for. Without the random crop the geometry is the eval
    transform's. Under crop_mode `squash` and `border` the random crop's aspect range is relative to the
    image (at full scale it keeps the whole image, as evaluation does), and `border` pads the crop to a
    square instead of stretching it."""

    def __init__(self, pre: PreprocessConfig, aug: Augment) -> None:
        self.size, self.aug, self.crop_mode, self.fill = pre.input_size, aug, pre.crop_mode, mean_fill(pre)
        self.resample = _interpolation(pre.interpolation)
        self.geometry = None if aug.random_resized_crop else eval_transform(pre)
        self.randaugment = None
        if aug.randaugment:
            from timm.data.auto_augment import rand_augment_transform

            self.randaugment = rand_augment_transform(
                aug.randaugment, {"img_mean": self.fill, "translate_const": int(self.size * 0.45)}
            )

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop with area in [crop_scale_min, 1] of the image and
        aspect ratio log-uniform in [3/4, 4/3] (relative to the image's own under squash and border); after
        10 misses, the largest centred crop in that range."""
        ratio = (3 / 4, 4 / 3)
        relative = self.crop_mode != "center"
        base = width / height if relative else 1.0
        area = width * height
        for _ in range(10):
            target = random.uniform(self.aug.crop_scale_min, 1.0) * area
            aspect = base * math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w <= width and h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                return left, top, left + w, top + h
        if relative:
            return 0, 0, width, height
        w, h = width, height
        if width / height < ratio[0]:
            h = int(round(width / ratio[0]))
        elif width / height > ratio[1]:
            w = int(round(height * ratio[1]))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def resized_crop(self, img: Image.Image) -> Image.Image:
        box = self.crop_box(*img.size)
        if self.crop_mode != "border":
            return img.resize((self.size, self.size), self.resample, box=box)
        kept = fitted(box[2] - box[0], box[3] - box[1], self.size)
        return pad_to_square(img.resize(kept, self.resample, box=box), self.size, self.fill)

    def __call__(self, img: Image.Image) -> np.ndarray:
        if self.geometry is not None:
            img = Image.fromarray(self.geometry(img).transpose(1, 2, 0))
        else:
            img = self.resized_crop(img)
        if random.random() < self.aug.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if random.random() < self.aug.vflip:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if self.aug.color_jitter > 0:
            img = self.jitter(img)
        if self.randaugment is not None:
            img = self.randaugment(img)
        return to_chw(img)

    def jitter(self, img: Image.Image) -> Image.Image:
        """Brightness, contrast and saturation by factors in [1 - j, 1 + j], in random order (as torchvision's
        ColorJitter with no hue)."""
        from PIL import ImageEnhance

        ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        random.shuffle(ops)
        j = self.aug.color_jitter
        for op in ops:
            img = op(img).enhance(random.uniform(max(0.0, 1 - j), 1 + j))
        return img


def train_transform(pre: PreprocessConfig, aug: Augment) -> Transform:
    return TrainTransform(pre, aug)


def decode_min_side(pre: PreprocessConfig, crop_scale_min: float = 1.0) -> int:
    """The smallest source side `decode_image(min_side=...)` may reduce a JPEG to without the transform
    upsampling: twice the eval resize target (so the final resize is still a real antialiased downsample),
    scaled up for a random crop that may keep only `crop_scale_min` of the area."""
    return math.ceil(2 * pre.resize_side / math.sqrt(crop_scale_min))


@functools.lru_cache(maxsize=8)
def cached_transform(pre: PreprocessConfig, aug: Augment | None = None) -> Transform:
    """The eval transform (aug None) or the train transform, built once per process."""
    return eval_transform(pre) if aug is None else train_transform(pre, aug)


def to_chw_uint8(img: Image.Image, pre: PreprocessConfig, aug: Augment | None = None) -> np.ndarray:
    """An RGB image through the eval (or train) transform -> C-contiguous uint8 (3, S, S)."""
    return cached_transform(pre, aug)(to_rgb(img))


def preprocess(data: bytes, pre: PreprocessConfig, aug: Augment | None = None) -> np.ndarray:
    """Image bytes -> uint8 (3, S, S): `decode_image` (limits, EXIF, RGB; JPEGs decoded reduced where that
    loses nothing) then the transform. Training, batch inference, Serve and `Predictor` all call this."""
    min_side = decode_min_side(pre, aug.crop_scale_min if aug and aug.random_resized_crop else 1.0)
    return to_chw_uint8(decode_image(data, max_pixels=pre.max_pixels, min_side=min_side), pre, aug)


def normalize(batch: torch.Tensor, pre: PreprocessConfig, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float on the batch's device (the one step that needs torch)."""
    import torch

    mean = torch.tensor(pre.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return ((batch.float() - mean) / std).to(dtype or torch.float32)
