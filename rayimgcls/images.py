"""Bytes -> RGB uint8 -> model input: the one preprocessing path of rayimgcls.

Training's evaluation, batch inference, Serve and the Python API all call `decode_image` and the transform
that `eval_transform` builds from the model directory's preprocessing config, so one file gives one tensor
everywhere. Transforms stop at uint8 CHW (timm's "prefetcher" form): Ray's object store carries 4x less
than float32, and `normalize` runs on the model's device.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

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


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image.

    The pixel count is checked from the header before any pixel is decoded (decompression bombs); the
    decode is complete (a truncated file fails here, unlike `verify()`); EXIF orientation is applied; every
    PIL mode becomes three-channel RGB (see `to_rgb`). With `min_side`, a JPEG is decoded at the largest
    DCT reduction (1/2, 1/4, 1/8) whose both sides stay >= min_side: several times faster on camera-size
    files, and the caller's resize still sees a larger picture than it produces.
    """
    if not data:
        raise ImageError("empty image: zero bytes", "empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"not a supported image format (accepted: {', '.join(ACCEPTED_FORMATS)})",
                         "unsupported_format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                                 "too_many_pixels")
            if min_side is not None and fmt == "JPEG":
                img.draft("RGB", (min_side, min_side))
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(str(e), "too_many_pixels") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        code = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "undecodable"
        raise ImageError(f"cannot decode {fmt}: {e}", code) from None
    return to_rgb(img)


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
        return cls(input_size=image_size, interpolation=cfg["interpolation"], crop_pct=float(cfg["crop_pct"]),
                   crop_mode=cfg.get("crop_mode", "center"), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def resize_side(self) -> int:
        """The shorter side the eval transform resizes to before its centre crop."""
        return math.floor(self.input_size / self.crop_pct)


Transform = Callable[[Image.Image], torch.Tensor]


def eval_transform(pre: PreprocessConfig) -> Transform:
    """Resize + centre crop -> uint8 CHW tensor: timm's eval transform, minus the normalisation."""
    return transforms_imagenet_eval(pre.input_size, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode,
                                    interpolation=pre.interpolation, use_prefetcher=True)


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation switches (timm's helpers do the work)."""

    random_resized_crop: bool = True
    crop_scale_min: float = 0.08
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    randaugment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1"


def train_transform(pre: PreprocessConfig, aug: Augment) -> Transform:
    """Augmenting transform -> uint8 CHW tensor. Without random_resized_crop the crop is the largest centred
    square (scale and ratio pinned to 1), resized to the input size."""
    scale, ratio = ((aug.crop_scale_min, 1.0), (3 / 4, 4 / 3)) if aug.random_resized_crop else ((1.0, 1.0), (1.0, 1.0))
    return transforms_imagenet_train(pre.input_size, scale=scale, ratio=ratio, hflip=aug.hflip, vflip=aug.vflip,
                                     color_jitter=aug.color_jitter, auto_augment=aug.randaugment,
                                     interpolation=pre.interpolation, use_prefetcher=True)


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
    out = cached_transform(pre, aug)(to_rgb(img))
    arr = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def preprocess(data: bytes, pre: PreprocessConfig, aug: Augment | None = None) -> np.ndarray:
    """Image bytes -> uint8 (3, S, S): `decode_image` (limits, EXIF, RGB; JPEGs decoded reduced where that
    loses nothing) then the transform. Training, batch inference, Serve and `Predictor` all call this."""
    min_side = decode_min_side(pre, aug.crop_scale_min if aug and aug.random_resized_crop else 1.0)
    return to_chw_uint8(decode_image(data, max_pixels=pre.max_pixels, min_side=min_side), pre, aug)


def normalize(batch: torch.Tensor, pre: PreprocessConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float on the batch's device."""
    mean = torch.tensor(pre.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return ((batch.float() - mean) / std).to(dtype)
