"""The Open Inference Protocol v2 (KServe's and Triton's HTTP API), without Ray: metadata, request parsing with
the binary tensor extension, and responses with the classification extension.

    GET  /v2                                          server metadata
    GET  /v2/models/{name}[/versions/{version}]       model metadata: inputs, outputs, platform
    GET  /v2/models/{name}[/versions/{version}]/ready 200 once a model replica answers
    POST /v2/models/{name}[/versions/{version}]/infer inference

Inputs: `image`, a BYTES tensor [N] or [N, 1] of encoded image files (JSON `data`: base64 strings), or `pixels`,
a UINT8 tensor [N, H, W, 3] of RGB pixels (decoding skipped; the same resize, crop and normalisation).
Outputs: `probabilities` FP32 [N, C] (softmax, or sigmoid for a multi-label model); asked for with
`"parameters": {"classification": k}` it is BYTES [N, k] of "<score>:<index>:<label>" instead, as Triton's
classification extension does; multi-label models add `labels`, BYTES [N], each a JSON list of the class names at
or above their thresholds. Tensors travel as JSON `data` or, as Triton's client sends by default, in the binary
tensor extension: a JSON header of `Inference-Header-Content-Length` bytes followed by the raw tensors, each input
saying its `binary_data_size`. Everything is checked before any pixel is decoded: datatypes, shapes, element
counts, the binary sizes adding up to the body, the image count and the pixel limits of `/v1`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from rayimgcls import __version__
from rayimgcls.card import ModelCard
from rayimgcls.config import ServeConfig
from rayimgcls.serve.http import ApiError, shown

INPUT_IMAGE, INPUT_PIXELS = "image", "pixels"
OUTPUT_PROBS, OUTPUT_LABELS = "probabilities", "labels"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "inference-header-content-length"
_MAX_DIM = 1 << 31  # no real tensor dimension comes near; larger ones are refused before any product is taken


# The code an error of the protocol's own is counted under (telemetry), by its status.
_STATUS_CODES = {
    401: "unauthorized",
    404: "not_found",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal",
    503: "unavailable",
}


class OipError(Exception):
    """A request the protocol refuses: answered with `status` and the protocol's {"error": message}."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status
        # The code of the README's table it is counted under: /v1's own when it was one of those, else the status's.
        self.code = code or _STATUS_CODES.get(status, "invalid_request")


def from_api_error(e: ApiError, input_name: str | None = None) -> OipError:
    """One of /v1's errors in the protocol's form: limits, deadlines, keys and our own bugs keep their status (401,
    408, 413, 500, 503); everything about the tensors themselves is a 400, naming the input and the image."""
    status = e.status if e.status in (401, 408, 413, 500, 503) else 400
    where = f"input {input_name!r}: " if input_name and e.index is not None else ""
    return OipError(where + e.message, status, e.code)


def server_metadata() -> dict[str, Any]:
    return {"name": "rayimgcls", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(card: ModelCard, name: str) -> dict[str, Any]:
    size = card.preprocess.input_size
    outputs = [{"name": OUTPUT_PROBS, "datatype": "FP32", "shape": [-1, card.num_classes]}]
    if card.multilabel:
        outputs.append({"name": OUTPUT_LABELS, "datatype": "BYTES", "shape": [-1]})
    return {
        "name": name,
        "versions": [card.version],
        "platform": "pytorch_timm",
        "inputs": [
            {"name": INPUT_IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": INPUT_PIXELS, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": outputs,
        "parameters": {
            "inputs": (
                f"send one of: {INPUT_IMAGE!r}, BYTES [N] or [N, 1] of encoded JPEG/PNG/WebP/GIF/BMP/TIFF files "
                f"(as JSON data: base64 strings); {INPUT_PIXELS!r}, UINT8 [N, H, W, 3] RGB pixels. Both are resized "
                f"and centre-cropped to {size}x{size} as the model was trained"
            ),
            "outputs": (
                f"{OUTPUT_PROBS!r}: FP32 [N, {card.num_classes}], "
                + ("independent sigmoids" if card.multilabel else "softmax")
                + '; with parameters {"classification": k}: BYTES [N, k] of "<score>:<index>:<label>"'
                + (
                    f"; {OUTPUT_LABELS!r}: BYTES [N], each a JSON list of the class names at or above their thresholds"
                    if card.multilabel
                    else ""
                )
            ),
            "class_names": card.class_names,
            "image_size": size,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[bytes] | np.ndarray  # BYTES: the elements; UINT8: the array in its shape


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int  # 0: the probabilities themselves


@dataclass
class InferRequest:
    id: str | None
    input: Tensor
    outputs: list[RequestedOutput]


def parse_request(body: bytes, header_length: str | None, card: ModelCard, cfg: ServeConfig) -> InferRequest:
    """The body of an infer request -> the one input tensor and the outputs asked for, all checked."""
    json_part, binary = split_body(body, header_length)
    doc = _load_json(json_part)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise OipError('expected a JSON object with "inputs": [{"name", "datatype", "shape", "data"}, ...]')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(f"id: expected a string, not {shown(request_id)}")
    params = _params(doc, "the request")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise OipError(f"parameters.binary_data_output: expected true or false, not {shown(binary_output)}")
    if len(doc["inputs"]) != 1:
        raise OipError(f"expected exactly one input ({INPUT_IMAGE!r} or {INPUT_PIXELS!r}), got {len(doc['inputs'])}")
    tensor, used = parse_input(doc["inputs"][0], binary, cfg)
    if used != len(binary):
        raise OipError(f"the binary section holds {len(binary)} bytes, the inputs' binary_data_size add up to {used}")
    return InferRequest(request_id, tensor, parse_outputs(doc.get("outputs"), card, binary_output))


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary section) by Inference-Header-Content-Length; without it the body is all JSON."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise OipError(f"Inference-Header-Content-Length: {shown(header_length)} is not a byte count")
    n = int(text)
    if n > len(body):
        raise OipError(f"Inference-Header-Content-Length {n} is past the end of the {len(body)}-byte body")
    return body[:n], body[n:]


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_int=lambda s: int(s) if len(s) <= 30 else math.inf)
    except RecursionError:
        raise OipError("the JSON header is nested too deeply") from None
    except ValueError as e:
        raise OipError(f"the JSON header is not valid JSON: {e}") from None


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise OipError(f"{what}: parameters must be an object")
    return params


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int for d in value):
        raise OipError(f"input {name!r}: shape must be a list of integers, not {shown(value)}")
    if any(d < 0 or d >= _MAX_DIM for d in value):
        raise OipError(f"input {name!r}: shape {shown(value)} has a negative or overflowing dimension")
    return value


def parse_input(obj: Any, binary: bytes, cfg: ServeConfig) -> tuple[Tensor, int]:
    """One input object (its data from JSON or from the binary section) -> (Tensor, binary bytes it used)."""
    if not isinstance(obj, dict):
        raise OipError("inputs[0]: expected an object")
    name, datatype = obj.get("name"), obj.get("datatype")
    expected = {INPUT_IMAGE: "BYTES", INPUT_PIXELS: "UINT8"}
    if not isinstance(name, str) or name not in expected:
        takes = f"{INPUT_IMAGE!r} (BYTES) or {INPUT_PIXELS!r} (UINT8)"
        raise OipError(f"input {shown(name)}: unknown; this model takes {takes}")
    if datatype != expected[name]:
        raise OipError(f"input {name!r}: datatype {shown(datatype)}, expected {expected[name]}")
    shape = _shape(obj.get("shape"), name)
    if name == INPUT_IMAGE and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise OipError(f"input {name!r}: shape {shape}, expected [N] or [N, 1]")
    if name == INPUT_PIXELS and not (len(shape) == 4 and shape[3] == 3 and shape[1] and shape[2]):
        raise OipError(f"input {name!r}: shape {shape}, expected [N, H, W, 3] with H, W >= 1")
    count = shape[0]
    if count == 0:
        raise OipError(f"input {name!r}: no images (shape {shape})")
    if count > cfg.max_images:
        raise OipError(f"input {name!r}: {count} images in one request; at most {cfg.max_images}")
    if name == INPUT_PIXELS:
        _check_pixel_shape(shape, cfg)
    size = _params(obj, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            fits = f"does not fit the {len(binary)}-byte binary section"
            raise OipError(f"input {name!r}: binary_data_size {shown(size)} {fits}")
        if "data" in obj:
            raise OipError(f"input {name!r}: both data and binary_data_size given")
        raw = binary[:size]
        data = _bytes_elements(raw, name, count) if name == INPUT_IMAGE else _uint8_binary(raw, shape, name)
        used = size
    elif "data" in obj:
        data = _b64_elements(obj["data"], name) if name == INPUT_IMAGE else _uint8_json(obj["data"], shape, name)
        used = 0
    else:
        raise OipError(f"input {name!r}: neither data nor parameters.binary_data_size")
    if name == INPUT_IMAGE and len(data) != count:
        raise OipError(f"input {name!r}: shape {shape} says {count} element(s), the data holds {len(data)}")
    return Tensor(name, datatype, shape, data), used


def _check_pixel_shape(shape: list[int], cfg: ServeConfig) -> None:
    n, h, w, _ = shape
    if h * w > cfg.max_pixels:
        raise OipError(f"input {INPUT_PIXELS!r}: {h}x{w} pixels per image, over the limit of {cfg.max_pixels}")
    if n * h * w > cfg.max_request_pixels:
        budget = cfg.max_request_pixels
        raise OipError(f"input {INPUT_PIXELS!r}: {n * h * w} pixels in all, over the request budget of {budget}", 413)


def _bytes_elements(raw: bytes, name: str, count: int) -> list[bytes]:
    """Triton's binary BYTES: each element a 4-byte little-endian length, then that many bytes. Parsing stops past
    `count` elements (the shape's), so a body of millions of empty elements costs nothing."""
    out, pos = [], 0
    while pos < len(raw):
        if len(out) == count:
            raise OipError(f"input {name!r}: more elements in the binary data than the shape's {count}")
        if pos + 4 > len(raw):
            raise OipError(f"input {name!r}: element {len(out)} has a cut-off length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise OipError(f"input {name!r}: element {len(out)} claims {n} bytes, {len(raw) - pos - 4} remain")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _flatten(data: Any, name: str) -> list[Any]:
    """The protocol allows tensor data flat (row-major) or nested; nesting deeper than a tensor's rank is refused."""
    out: list[Any] = []
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth > 4:
                raise OipError(f"input {name!r}: data nested deeper than the tensor's shape")
            stack.extend((x, depth + 1) for x in reversed(item))
        else:
            out.append(item)
    return out


def _b64_elements(data: Any, name: str) -> list[bytes]:
    if not isinstance(data, list):
        raise OipError(f"input {name!r}: data must be a list of base64 strings")
    out = []
    for i, item in enumerate(_flatten(data, name)):
        if not isinstance(item, str):
            raise OipError(f"input {name!r}: element {i} is {type(item).__name__}, expected a base64 string")
        try:
            out.append(base64.b64decode("".join(item.split()), validate=True))
        except (binascii.Error, ValueError) as e:
            raise OipError(f"input {name!r}: element {i} is not valid base64 ({e})") from None
    return out


def _uint8_binary(raw: bytes, shape: list[int], name: str) -> np.ndarray:
    expected = math.prod(shape)
    if len(raw) != expected:
        raise OipError(f"input {name!r}: shape {shape} needs {expected} bytes, binary_data_size gives {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _uint8_json(data: Any, shape: list[int], name: str) -> np.ndarray:
    flat = _flatten(data if isinstance(data, list) else [data], name)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise OipError(f"input {name!r}: shape {shape} says {expected} elements, the data holds {len(flat)}")
    if not all(type(v) is int and 0 <= v <= 255 for v in flat):
        raise OipError(f"input {name!r}: UINT8 data must be integers in 0..255")
    return np.asarray(flat, dtype=np.uint8).reshape(shape)


def parse_outputs(value: Any, card: ModelCard, binary_output: bool) -> list[RequestedOutput]:
    """The outputs asked for (all of them when none are named), each in binary or JSON."""
    known = [OUTPUT_PROBS] + ([OUTPUT_LABELS] if card.multilabel else [])
    if value is None:
        return [RequestedOutput(name, binary_output, 0) for name in known]
    if not isinstance(value, list) or not value:
        raise OipError('outputs: expected a list like [{"name": "probabilities"}]')
    out, seen = [], set()
    for obj in value:
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or name not in known:
            raise OipError(f"output {shown(name)}: unknown; this model has {', '.join(map(repr, known))}")
        if name in seen:
            raise OipError(f"output {name!r} requested twice")
        seen.add(name)
        params = _params(obj, f"output {name!r}")
        binary = params.get("binary_data", binary_output)
        k = params.get("classification", 0)
        if not isinstance(binary, bool):
            raise OipError(f"output {name!r}: binary_data must be true or false")
        if type(k) is not int or not 0 <= k <= card.num_classes or (k and name != OUTPUT_PROBS):
            raise OipError(f"output {name!r}: classification {shown(k)}, expected an integer in 1..{card.num_classes}")
        out.append(RequestedOutput(name, binary, k))
    return out


# ---------------------------------------------------------------------------------------------------------
# Responses


def output_tensor(output: RequestedOutput, probs: np.ndarray, card: ModelCard) -> tuple[str, list[int], Any]:
    """(datatype, shape, data as a numpy array or a list of bytes) of one requested output."""
    n = len(probs)
    if output.name == OUTPUT_LABELS:
        above = probs >= np.asarray(card.thresholds)[None, :]
        names = [json.dumps([card.class_names[c] for c in np.flatnonzero(row)]).encode() for row in above]
        return "BYTES", [n], names
    if output.classification:
        k = output.classification
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        cells = [f"{probs[i, c]:f}:{c}:{card.class_names[c]}".encode() for i in range(n) for c in order[i]]
        return "BYTES", [n, k], cells
    return "FP32", [n, card.num_classes], probs.astype(np.float32)


def encode_response(
    request: InferRequest, probs: np.ndarray, card: ModelCard, name: str
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or a JSON header followed by the binary outputs."""
    outputs, chunks = [], []
    for output in request.outputs:
        datatype, shape, data = output_tensor(output, probs, card)
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            raw = b"".join(struct.pack("<I", len(x)) + x for x in data) if datatype == "BYTES" else data.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [x.decode() for x in data] if datatype == "BYTES" else data.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": name, "model_version": card.version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
