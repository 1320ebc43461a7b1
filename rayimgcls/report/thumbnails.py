"""Small pictures of dataset images for a report, made with the one decode path (`images.decode_image`).

Reads local or object-storage data roots through `storage` (paths checked to stay under the root); a missing,
unreadable or undecodable file becomes a placeholder with the reason, never an exception: a report about
broken data must still be written. A few threads hide object-storage latency; memory stays bounded because
each image is reduced as soon as it is decoded (JPEGs decode at a DCT reduction close to the thumbnail size).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rayimgcls import storage
from rayimgcls.images import decode_image

SIDE = 160  # pixels of the longer side: sharp in a ~150 CSS-pixel card, ~5 KB as JPEG
THREADS = 4  # each may hold one decoded image (up to images.DEFAULT_MAX_PIXELS)


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    mime: str
    error: str | None = None  # why the placeholder stands in for the picture


def thumbnails(data_root: str, paths: Sequence[str], side: int = SIDE) -> dict[str, Thumbnail]:
    """{path: Thumbnail} for the distinct `paths` (relative to `data_root`, as written in the CSV)."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(THREADS) as pool:
        return dict(zip(unique, pool.map(lambda p: thumbnail(data_root, p, side), unique), strict=True))


def thumbnail(data_root: str, path: str, side: int = SIDE) -> Thumbnail:
    try:
        img = decode_image(storage.read_bytes(storage.resolve_under(data_root, path)), min_side=side)
    except FileNotFoundError:
        return Thumbnail(placeholder(side), "image/png", "file not found")  # the card shows the path already
    except (OSError, ValueError) as e:  # unreadable (OSError), escaping or undecodable (ValueError)
        return Thumbnail(placeholder(side), "image/png", str(e) or type(e).__name__)
    from PIL import Image

    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    factor = side // max(img.size)
    if factor >= 2:  # a tiny image is enlarged with hard edges, not blurred by the browser
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return Thumbnail(buf.getvalue(), "image/jpeg")


@functools.cache
def placeholder(side: int = SIDE) -> bytes:
    """A grey tile with a cross: the picture that could not be made."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (234, 238, 242))
    draw = ImageDraw.Draw(img)
    m = side // 3
    draw.line((m, m, side - m, side - m), fill=(140, 149, 159), width=max(2, side // 40))
    draw.line((m, side - m, side - m, m), fill=(140, 149, 159), width=max(2, side // 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
