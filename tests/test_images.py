"""images.py: every PIL mode to RGB, EXIF, limits, truncation, sniffing, and the eval transform matching
timm's to the pixel."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from conftest import encode, odd_image_bytes
from PIL import Image
from timm.data.transforms_factory import transforms_imagenet_eval

from rayimgcls.images import (
    ALPHA_BACKGROUND,
    Augment,
    ImageError,
    PreprocessConfig,
    decode_image,
    decode_min_side,
    eval_transform,
    preprocess,
    sniff_format,
    to_rgb,
    train_transform,
)

RNG = np.random.default_rng(0)
RGB = Image.fromarray(RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr", "RGB"])
def test_every_mode_becomes_rgb_uint8(mode):
    wide = {"I;16": np.uint16, "I": np.int32, "F": np.float32}
    if mode in wide:
        img = Image.fromarray(np.asarray(RGB.convert("L"), dtype=wide[mode]))
    else:
        img = RGB.convert("P").convert("PA") if mode == "PA" else RGB.convert(mode)
    out = np.asarray(to_rgb(img))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8


def test_alpha_is_composited_over_the_background():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert tuple(np.asarray(to_rgb(rgba))[0, 0]) == ALPHA_BACKGROUND
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert 120 <= np.asarray(to_rgb(half))[0, 0, 0] <= 135


def test_sixteen_bit_scales_to_eight_bit():
    img = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(img)).max() == 255
    img = Image.fromarray(np.full((2, 2), 257 * 100, dtype=np.uint16))
    assert np.asarray(to_rgb(img))[0, 0, 0] == 100


def test_float_images_in_unit_range_are_scaled():
    img = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert np.asarray(to_rgb(img))[0, 0, 0] in (127, 128)


def test_exif_orientation_is_applied():
    data = odd_image_bytes()["exif_rotated.jpg"]
    assert Image.open(io.BytesIO(data)).size == (64, 48)  # stored landscape
    assert decode_image(data).size == (48, 64)  # shown portrait


def test_decodes_every_odd_file():
    for name, data in odd_image_bytes().items():
        img = decode_image(data)
        assert img.mode == "RGB", name


def test_truncated_jpeg_and_png_fail_on_full_decode():
    for fmt in ("JPEG", "PNG"):
        data = encode(RGB.resize((200, 200)), fmt)
        with pytest.raises(ImageError) as e:
            decode_image(data[: len(data) * 2 // 3])
        assert e.value.code == "truncated", str(e.value)


def test_pixel_limit_is_checked_from_the_header():
    bomb = encode(Image.new("L", (6000, 6000)), "PNG")  # a few KB on disk, 36 MP decoded
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as e:
        decode_image(bomb, max_pixels=10_000_000)
    assert e.value.code == "too_many_pixels" and "36000000" in str(e.value)


def test_non_images_and_unsupported_formats_are_refused():
    for data in (b"hello world", b"%!PS-Adobe-3.0 EPSF-3.0\n", encode(RGB, "TGA"), encode(RGB, "ICO")):
        with pytest.raises(ImageError) as e:
            decode_image(data)
        assert e.value.code == "unsupported_format"
    with pytest.raises(ImageError) as e:
        decode_image(b"")
    assert e.value.code == "empty"
    with pytest.raises(ImageError) as e:
        decode_image(b"\xff\xd8\xff" + b"\x00" * 100)
    assert e.value.code in ("undecodable", "truncated")


def test_sniffing_names_the_format():
    assert sniff_format(encode(RGB, "PNG")) == "PNG"
    assert sniff_format(encode(RGB, "JPEG")) == "JPEG"
    assert sniff_format(encode(RGB, "WEBP")) == "WEBP"
    assert sniff_format(b"GIF89a...") == "GIF"
    assert sniff_format(b"nope") is None


@pytest.mark.parametrize(
    "size,crop_pct,interpolation", [(32, 0.9, "bicubic"), (224, 0.875, "bicubic"), (40, 1.0, "bilinear")]
)
def test_eval_transform_matches_timm_to_the_pixel(size, crop_pct, interpolation):
    ours = eval_transform(PreprocessConfig(input_size=size, crop_pct=crop_pct, interpolation=interpolation))
    timms = transforms_imagenet_eval(size, crop_pct=crop_pct, interpolation=interpolation, use_prefetcher=True)
    for shape in ((37, 53), (300, 200), (224, 224), (65, 500)):
        img = Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
        a = ours(img)
        assert a.shape == (3, size, size) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, timms(img).numpy())


def test_train_transform_is_random_but_shaped_like_eval():
    pre = PreprocessConfig(input_size=32)
    t = train_transform(pre, Augment(crop_scale_min=0.3, vflip=0.5))
    random.seed(1)
    outs = [t(RGB) for _ in range(5)]
    assert all(o.shape == (3, 32, 32) and o.dtype == np.uint8 for o in outs)
    assert any((outs[0] != o).any() for o in outs[1:])
    fixed = train_transform(pre, Augment(random_resized_crop=False, hflip=0, color_jitter=0))
    np.testing.assert_array_equal(fixed(RGB), fixed(RGB))


def test_reduced_jpeg_decode_keeps_the_picture():
    """draft() decoding of a big JPEG stays within a few grey levels of the full decode after resizing."""
    from rayimgcls.synth import render_image

    big = encode(render_image(np.random.default_rng(3), [2], (1600, 1200)), "JPEG", quality=90)
    pre = PreprocessConfig(input_size=224)
    assert decode_image(big, min_side=decode_min_side(pre)).size[0] < 1600  # it did decode reduced
    reduced = preprocess(big, pre).astype(int)
    full = eval_transform(pre)(decode_image(big)).astype(int)
    assert np.abs(reduced - full).mean() < 2.0
