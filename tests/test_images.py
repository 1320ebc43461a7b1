"""images.py: every PIL mode to RGB, EXIF, limits, truncation, sniffing, and the eval transform matching
timm's to the pixel."""

from __future__ import annotations

import contextlib
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


def two_to_one() -> Image.Image:
    """A 64x32 picture whose outer quarters are red (left) and blue (right): a centre crop loses both."""
    a = np.full((32, 64, 3), 128, np.uint8)
    a[:, :8] = (255, 0, 0)
    a[:, 56:] = (0, 0, 255)
    return Image.fromarray(a)


def keeps_both_ends(chw: np.ndarray) -> bool:
    r, g, b = chw.astype(int)
    return bool(((r > 200) & (b < 50)).any() and ((b > 200) & (r < 50)).any())


def test_squash_and_border_keep_both_halves_of_a_two_to_one_image():
    """The measured failure of issue 14: on 2:1 images the centre crop keeps half of each digit. Under squash
    and border the eval transform, the `none` preset (no random crop) and a full-scale random resized crop
    all keep both ends; border pads with the mean colour instead of stretching."""
    img = two_to_one()
    light_full = Augment(crop_scale_min=1.0, hflip=0.0, color_jitter=0.0)
    none = Augment(random_resized_crop=False, crop_scale_min=1.0, hflip=0.0, color_jitter=0.0)
    random.seed(0)
    for mode in ("squash", "border"):
        pre = PreprocessConfig(input_size=32, crop_pct=1.0, crop_mode=mode)
        assert keeps_both_ends(eval_transform(pre)(img)), mode
        assert all(keeps_both_ends(train_transform(pre, light_full)(img)) for _ in range(10)), mode
        np.testing.assert_array_equal(train_transform(pre, none)(img), eval_transform(pre)(img))
    center = PreprocessConfig(input_size=32, crop_pct=1.0, crop_mode="center")
    assert not keeps_both_ends(eval_transform(center)(img))
    assert not any(keeps_both_ends(train_transform(center, light_full)(img)) for _ in range(10))
    border = eval_transform(PreprocessConfig(input_size=32, crop_pct=1.0, crop_mode="border"))(img)
    assert border.shape == (3, 32, 32) and tuple(border[:, 0, 16]) == (124, 116, 104)  # the mean, padded on top
    assert tuple(border[:, 16, 0]) == (255, 0, 0)  # the long side is fitted, not cropped


def test_reduced_jpeg_decode_keeps_the_picture():
    """draft() decoding of a big JPEG stays within a few grey levels of the full decode after resizing."""
    from rayimgcls.synth import render_image

    big = encode(render_image(np.random.default_rng(3), [2], (1600, 1200)), "JPEG", quality=90)
    pre = PreprocessConfig(input_size=224)
    assert decode_image(big, min_side=decode_min_side(pre)).size[0] < 1600  # it did decode reduced
    reduced = preprocess(big, pre).astype(int)
    full = eval_transform(pre)(decode_image(big)).astype(int)
    assert np.abs(reduced - full).mean() < 2.0


def test_shorter_side_resize_computes_only_the_crop():
    """Extreme shapes are resized only where the centre crop keeps pixels: the same picture as a full resize
    followed by the crop (timm's order), within a grey level on average even for noise upsampled 7x (ordinary
    shapes take the full resize and are compared to the pixel against timm above)."""
    from rayimgcls.images import resize_and_crop, resized_shorter

    for shape in ((3, 700), (900, 5), (2, 3000)):
        img = Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
        resized = resized_shorter(*img.size, 36)
        full = img.resize(resized, Image.BICUBIC)
        left, top = int(round((resized[0] - 32) / 2.0)), int(round((resized[1] - 32) / 2.0))
        want = np.asarray(full.crop((left, top, left + 32, top + 32)))
        got = np.asarray(resize_and_crop(img, resized, 32, Image.BICUBIC)).astype(int)
        assert np.abs(got - want).mean() < 1.0, shape


THIN_IMAGES = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a full resize of these needs 20-150 GB
from PIL import Image
from rayimgcls.images import PreprocessConfig, preprocess
import io
for size in [(1, 40_000_000), (100_000, 1), (1, 100_000)]:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    for mode in ("center", "squash", "border"):
        out = preprocess(buf.getvalue(), PreprocessConfig(input_size=224, crop_mode=mode))
        assert out.shape == (3, 224, 224) and (out == 128).all(axis=0).any(), (size, mode)  # border pads the rest
print("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MB peak")
"""


@pytest.mark.timeout(120)
def test_thin_and_long_images_preprocess_in_bounded_memory():
    """A 1 x 40,000,000 PNG (40 KB, under the 50 MP limit) and 1 x 100,000 images: before the bounded resize
    the first was a MemoryError and the others allocated gigabytes; now they predict in a 3 GiB address space."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", THIN_IMAGES], capture_output=True, text=True, timeout=110)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]


def test_any_failure_inside_the_decoder_is_an_image_error():
    """A TIFF whose StripOffsets tag says DOUBLE makes PIL raise TypeError from load(); random byte flips in
    every accepted format raise whatever their plugin raises. All of it is an ImageError (a 422 or an error
    line), never another exception."""
    tiff = encode(Image.new("L", (24, 20)), "TIFF")
    strip_offsets_long = b"\x11\x01\x04\x00"  # IFD entry: tag 0x0111, type LONG (little-endian TIFF)
    assert tiff.count(strip_offsets_long) == 1
    bad = tiff.replace(strip_offsets_long, b"\x11\x01\x0c\x00")
    with pytest.raises(ImageError) as e:
        preprocess(bad, PreprocessConfig(input_size=16))
    assert e.value.code == "undecodable"
    rng = random.Random(7)
    for fmt in ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP"):
        data = encode(RGB.convert("L") if fmt == "TIFF" else RGB, fmt)
        for _ in range(60):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(min(len(data), 200))] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
            with contextlib.suppress(ImageError):  # pixels or an ImageError; anything else fails the test
                preprocess(bytes(flipped), PreprocessConfig(input_size=16))


def test_border_with_a_small_crop_pct_resizes_only_what_the_canvas_keeps():
    """Past FULL_RESIZE_AREA canvases `border` resizes only the kept part: the same picture as the full fit
    followed by the pad/crop, within a grey level on average (ordinary settings take the full resize)."""
    from rayimgcls.images import FULL_RESIZE_AREA, fitted, mean_fill, pad_to_square

    for shape, crop_pct in (((200, 300), 0.1), ((300, 40), 0.03), ((37, 53), 0.02)):
        img = Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
        pre = PreprocessConfig(input_size=32, crop_pct=crop_pct, crop_mode="border")
        assert np.prod(fitted(*img.size, pre.resize_side)) > FULL_RESIZE_AREA * 32 * 32  # the bounded path
        full = pad_to_square(img.resize(fitted(*img.size, pre.resize_side), Image.BICUBIC), 32, mean_fill(pre))
        got = eval_transform(pre)(img).astype(int)
        assert np.abs(got - np.asarray(full).transpose(2, 0, 1)).mean() < 1.0, (shape, crop_pct)


def test_mean_fill_never_overflows():
    """A mean of 1e308 (a hand-edited config.json, before card.py bounded it) raised OverflowError in
    round(255 * m), blamed on the image being transformed; the fill is clamped to 0..255."""
    from rayimgcls.images import mean_fill

    assert mean_fill(PreprocessConfig(mean=(1e308, -1.0, float("nan")))) == (255, 0, 0)
    assert mean_fill(PreprocessConfig(mean=(0.485, 0.456, 0.406))) == (124, 116, 104)
    border = PreprocessConfig(input_size=16, crop_mode="border", mean=(1e308, 0.0, 0.0))
    assert tuple(eval_transform(border)(Image.new("RGB", (32, 16)))[:, 0, 8]) == (255, 0, 0)


SMALL_CROP_PCT = """
import resource, random
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the full fit of crop_pct 1e-4 is ~5e12 pixels
from PIL import Image
from rayimgcls.images import Augment, PreprocessConfig, eval_transform, train_transform
pre = PreprocessConfig(input_size=224, crop_pct=1e-4, crop_mode="border")
img = Image.new("RGB", (300, 200), (10, 200, 10))
fixed = Augment(random_resized_crop=False, hflip=0.0, color_jitter=0.0)
for t in (eval_transform(pre), train_transform(pre, fixed), train_transform(pre, Augment())):
    out = t(img)
    assert out.shape == (3, 224, 224) and (out[:, 112, 112] > 100).any(), out[:, 112, 112]
print("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MB peak")
"""


@pytest.mark.timeout(120)
def test_border_mode_memory_is_bounded_whatever_the_crop_pct():
    """The review's finding: border's eval transform fitted the image to size / crop_pct in full before padding
    (crop_pct 1e-4: ~300 GB per image, in Serve's ingress too). Eval, the train transform without the random
    crop (the eval geometry) and with it now run in a 3 GiB address space."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", SMALL_CROP_PCT], capture_output=True, text=True, timeout=110)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]
