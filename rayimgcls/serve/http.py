"""The HTTP side of serving, without Ray: the error table, body reading under limits and deadlines, request
parsing, top_k, the pixel budget and decoding (DESIGN.md §6).

Everything a client sends is hostile until parsed: bodies are counted as they arrive (never trusting
Content-Length), must keep arriving (an idle and a total deadline), and share a per-replica memory budget;
multipart parts are counted as they stream and a body that ends before its closing boundary is refused, never
answered for fewer images than it carried; JSON of any depth or number size cannot raise past the parser; the
pixels of a request are summed from the image headers before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from rayimgcls.config import ServeConfig
from rayimgcls.images import ImageError, PreprocessConfig, image_pixels, preprocess
from rayimgcls.text import printable

# Every error code and its status (DESIGN.md §6, the README's table); clients branch on `code`, people read `error`.
ERROR_STATUS: dict[str, int] = {
    "empty_body": 400,
    "malformed_json": 400,
    "malformed_multipart": 400,
    "invalid_request": 400,
    "bad_base64": 400,
    "bad_top_k": 400,
    "too_many_images": 400,
    "empty_image": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "body_too_large": 413,
    "pixel_budget_exceeded": 413,
    "unsupported_media_type": 415,
    "unsupported_format": 415,
    "undecodable": 422,
    "truncated": 422,
    "too_many_pixels": 422,
    "internal": 500,
    "not_ready": 503,
    "unavailable": 503,
}
RETRY_AFTER_S = 1  # what a 503 tells a client to wait: Serve replaces a dead replica within seconds
JSON_FORM = '{"images": [{"b64": "<base64>"}], "top_k": 5}'
BODY_TYPES = ("multipart/form-data", "application/json", "application/octet-stream", "")
_IMAGE_CODES = {"empty": "empty_image"}  # ImageError codes renamed for HTTP; the others keep their names
# ASCII digits only: str.isdigit() also accepts '³' and '٣', which int() refuses; at most 9 of them, so no
# number of thousands of digits ever reaches int().
_TOP_K = re.compile(r"\+?[0-9]{1,9}")
_MAX_FIELD_BYTES = 64  # the one text field, top_k, is a short number


class ApiError(Exception):
    """A client mistake (or a busy server): answered with ERROR_STATUS[code] and {"error", "code"[, "index"]}."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.index = code, message, index

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]

    @property
    def headers(self) -> dict[str, str]:
        if self.code == "unauthorized":
            return {"WWW-Authenticate": "Bearer"}
        if self.status == 503:
            return {"Retry-After": str(RETRY_AFTER_S)}
        return {}

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.index is not None:
            body["index"] = self.index
        return JSONResponse(body, self.status, self.headers)


def shown(value: Any, limit: int = 40) -> str:
    """A client's value for an error message: repr, control characters escaped, cut to `limit` characters."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# The body: counted, deadlined, budgeted


class BodyBudget:
    """Bytes of request bodies one replica holds in memory at once. Each request is capped by max_body_bytes; this
    caps their sum, so many concurrent uploads cannot exhaust the replica: past it a new chunk is a 503."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def lease(self) -> BodyLease:
        return BodyLease(self)


class BodyLease:
    """One request's share of the BodyBudget; `release()` when its bytes are no longer held."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.held = budget, 0

    def take(self, n: int) -> None:
        if self.budget.used + n > self.budget.limit:
            raise ApiError("unavailable", f"the server holds {self.budget.used} bytes of request bodies; retry")
        self.budget.used += n
        self.held += n

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


async def body_chunks(request: Request, cfg: ServeConfig, lease: BodyLease) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, within the byte limit and both deadlines (no byte for
    body_idle_timeout_s, or the whole body past body_timeout_s: 408); each chunk is taken from `lease`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cfg.max_body_bytes:  # refuse early; the count below is the truth
        raise ApiError("body_too_large", f"body of {declared} bytes exceeds the limit of {cfg.max_body_bytes} bytes")
    stream, size = request.stream().__aiter__(), 0
    deadline = time.monotonic() + cfg.body_timeout_s
    while True:
        wait = min(cfg.body_idle_timeout_s, deadline - time.monotonic())
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
        except StopAsyncIteration:
            return
        except TimeoutError:
            total = wait < cfg.body_idle_timeout_s
            why = f"not complete after {cfg.body_timeout_s:g} s" if total else f"idle for {cfg.body_idle_timeout_s:g} s"
            raise ApiError("request_timeout", f"request body {why} ({size} bytes received)") from None
        except ClientDisconnect:
            raise ApiError("invalid_request", "client disconnected before the body was complete") from None
        size += len(chunk)
        if size > cfg.max_body_bytes:
            raise ApiError("body_too_large", f"body exceeds the limit of {cfg.max_body_bytes} bytes")
        lease.take(len(chunk))
        yield chunk


# ---------------------------------------------------------------------------------------------------------
# Request forms -> image bytes in request order, and the raw top_k


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def check_media_type(media: str) -> None:
    if media not in BODY_TYPES and not media.startswith("image/"):
        raise ApiError(
            "unsupported_media_type",
            f"content type {shown(media)} is not taken: send image/* bytes, multipart/form-data files "
            f"or application/json {JSON_FORM}",
        )


async def read_images(request: Request, cfg: ServeConfig, lease: BodyLease) -> tuple[list[bytes], Any]:
    """Dispatch on the content type and read the body -> (image bytes in request order, the body's raw top_k)."""
    media = media_type(request)
    check_media_type(media)
    multipart = media.startswith("multipart/")
    form = FormImages(request.headers.get("content-type", ""), cfg.max_images) if multipart else None
    chunks = []
    async for chunk in body_chunks(request, cfg, lease):
        if form is not None:
            form.feed(chunk)  # parsed as it streams: too many parts are refused before the rest arrives
        else:
            chunks.append(chunk)
    if not lease.held:
        raise ApiError("empty_body", "empty request body: send an image, a multipart form or JSON")
    if form is not None:
        images, top_k = form.finish()
    elif media == "application/json":
        images, top_k = json_images(b"".join(chunks), cfg.max_images)
    else:
        images, top_k = [b"".join(chunks)], None
    if not images:
        raise ApiError("invalid_request", "no images in the request")
    if len(images) > cfg.max_images:
        raise ApiError("too_many_images", f"{len(images)} images in one request; at most {cfg.max_images}")
    return images, top_k


def _bounded_int(text: str) -> int | float:
    """json's parse_int: a number of thousands of digits is inf (refused where it is used), not a ValueError
    from int() that would make the whole document 'malformed'."""
    return int(text) if len(text) <= 30 else math.inf


def json_images(body: bytes, max_images: int) -> tuple[list[bytes], Any]:
    """{"images": [{"b64": ...}, ...], "top_k": k} -> image bytes and the raw top_k. The images are counted
    before any is decoded."""
    try:
        doc = json.loads(body, parse_int=_bounded_int)
    except RecursionError:
        raise ApiError("malformed_json", "body is not usable JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError("malformed_json", f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ApiError("invalid_request", f"expected a JSON object like {JSON_FORM}")
    unknown = sorted(set(doc) - {"images", "top_k"})
    if unknown:
        raise ApiError("invalid_request", f"unknown key(s) {shown(unknown, 80)}: expected {JSON_FORM}")
    if len(doc["images"]) > max_images:
        raise ApiError("too_many_images", f"{len(doc['images'])} images in one request; at most {max_images}")
    return [b64_image(item, i) for i, item in enumerate(doc["images"])], doc.get("top_k")


def b64_image(item: Any, index: int) -> bytes:
    """One {"b64": ...} entry. A data: URL prefix and line breaks are tolerated, nothing else."""
    if not isinstance(item, dict) or not isinstance(item.get("b64"), str) or set(item) != {"b64"}:
        raise ApiError("invalid_request", f'images[{index}]: expected {{"b64": "<base64>"}}', index)
    text = item["b64"]
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError("bad_base64", f"images[{index}]: not valid base64 ({e})", index) from None


class FormImages:
    """multipart/form-data, parsed as it streams: every file part is an image, in order; `top_k` is the one text
    field. The body must end with its closing boundary: a last part cut short is refused, never dropped."""

    def __init__(self, content_type: str, max_images: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError("malformed_multipart", "multipart/form-data without a boundary in its Content-Type")
        self.boundary, self.max_images = boundary.decode("latin-1"), max_images
        self.images: list[bytes] = []
        self.top_k: str | None = None
        self.ended = False
        self._header_field, self._header_value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._data: list[bytes] = []
        self._is_file = False
        try:
            self.parser = MultipartParser(self.boundary, self._callbacks())
        except FormParserError as e:
            raise ApiError("malformed_multipart", f"cannot parse the multipart body: {e}") from None

    def _callbacks(self) -> dict[str, Any]:
        def header_field(data: bytes, start: int, end: int) -> None:
            self._header_field += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self._header_value += data[start:end]

        def header_end() -> None:
            self._headers[self._header_field.strip().lower()] = self._header_value.strip()
            self._header_field, self._header_value = b"", b""

        def part_data(data: bytes, start: int, end: int) -> None:
            if not self._is_file and sum(map(len, self._data)) + end - start > _MAX_FIELD_BYTES:
                raise ApiError("bad_top_k", f"form field top_k longer than {_MAX_FIELD_BYTES} bytes")
            self._data.append(data[start:end])

        def end() -> None:
            self.ended = True

        return {
            "on_part_begin": self._part_begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": part_data,
            "on_part_end": self._part_end,
            "on_end": end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data = {}, []

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._is_file = b"filename" in options
        if self._is_file:
            if len(self.images) >= self.max_images:
                raise ApiError("too_many_images", f"more than {self.max_images} images in one request")
            return
        name = options.get(b"name", b"").decode("latin-1")
        if name != "top_k":
            raise ApiError(
                "invalid_request",
                f"form field {shown(name)} is not a file: send images as file parts "
                "(curl -F file=@photo.jpg); the only text field is top_k",
            )

    def _part_end(self) -> None:
        data = b"".join(self._data)
        if self._is_file:
            self.images.append(data)
        else:
            self.top_k = data.decode("utf-8", errors="replace")

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as e:
            raise ApiError("malformed_multipart", f"cannot parse the multipart body: {e}") from None

    def finish(self) -> tuple[list[bytes], str | None]:
        if not self.ended:
            raise ApiError(
                "malformed_multipart",
                f"the multipart body ends before its closing boundary (--{shown(self.boundary, 60)}--): "
                f"{len(self.images)} complete file part(s), and the body was cut off",
            )
        return self.images, self.top_k


def query_top_k(request: Request) -> str | None:
    """The query string's top_k (once at most)."""
    values = request.query_params.getlist("top_k")
    if len(values) > 1:
        raise ApiError("bad_top_k", f"top_k given {len(values)} times in the query string")
    return values[0] if values else None


def parse_top_k(value: Any, num_classes: int) -> int:
    """A query string, form field or JSON value -> k in 1..num_classes; None -> min(5, num_classes)."""
    if value is None:
        return min(5, num_classes)
    k = None
    if isinstance(value, str) and _TOP_K.fullmatch(value.strip()):
        k = int(value)
    elif type(value) is int:  # not a bool, not a float
        k = value
    if k is None or not 1 <= k <= num_classes:
        raise ApiError("bad_top_k", f"top_k={shown(value)}: expected an integer in 1..{num_classes}")
    return k


# ---------------------------------------------------------------------------------------------------------
# Pixels: the budget from the headers, then the one preprocessing path


def image_error(e: ImageError, index: int) -> ApiError:
    return ApiError(_IMAGE_CODES.get(e.code, e.code), f"image {index}: {e}", index)


def check_pixels(images: list[bytes], max_pixels: int, budget: int) -> None:
    """Each image's width x height from its header against max_pixels, and their sum against the request's
    budget, before any pixel is decoded: 64 solid-colour 50 MP PNGs are 3 MB on the wire and minutes of CPU."""
    total = 0
    for i, data in enumerate(images):
        try:
            pixels = image_pixels(data)
        except ImageError as e:
            raise image_error(e, i) from None
        if pixels > max_pixels:
            message = f"image {i}: {pixels} pixels exceeds the limit of {max_pixels}"
            raise ApiError("too_many_pixels", message, i)
        total += pixels
        if total > budget:
            raise ApiError(
                "pixel_budget_exceeded",
                f"images 0..{i} hold {total} pixels, over the request budget of {budget}: "
                "send fewer or smaller images per request",
                i,
            )


def decode_all(images: list[bytes], pre: PreprocessConfig, pixel_budget: int) -> list[np.ndarray]:
    """The one preprocessing path for every image; the first bad one fails the request, naming its index."""
    check_pixels(images, pre.max_pixels, pixel_budget)
    arrays = []
    for i, data in enumerate(images):
        try:
            arrays.append(preprocess(data, pre))
        except ImageError as e:
            raise image_error(e, i) from None
    return arrays
