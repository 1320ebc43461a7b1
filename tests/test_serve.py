"""The Serve endpoint over real HTTP on loopback: the API and every error code of DESIGN §6, batching, the API
key, multi-label answers, parity with the Python API, the serve config, and `rayimgcls serve` run as a user
runs it. One Serve instance for the module holds two applications: the 4-class model without a key at `/`, and
the multi-label model behind an API key at `/secured`."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import IMAGE_SIZE, NUM_CLASSES, encode, free_port, odd_image_bytes
from PIL import Image
from typer.testing import CliRunner

from rayimgcls.card import ModelError, read_card
from rayimgcls.config import ConfigError, ServeConfig
from rayimgcls.model import Predictor

API_KEY = "test-key-0123"
SETTINGS = {  # small reservations so both applications fit in the session's 2 CPUs
    "num_cpus": 0.25,
    "ingress_num_cpus": 0.1,
    "precision": "fp32",
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.05,
    "max_body_bytes": 200_000,
    "max_pixels": 4_000_000,
    "max_request_pixels": 6_000_000,
    "max_images": 8,
    "body_idle_timeout_s": 3.0,
    "body_timeout_s": 12.0,
}
MEDIA = {".jpg": "image/jpeg", ".png": "image/png"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def url(ray_session, model_dir, multilabel_model_dir) -> Iterator[str]:
    """Base URL of the module's Serve instance (both applications deployed and running)."""
    from ray import serve

    from rayimgcls.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many(
        [
            serve.RunTarget(build_app({"model_dir": str(model_dir), **SETTINGS}), name="plain", route_prefix="/"),
            serve.RunTarget(
                build_app({"model_dir": str(multilabel_model_dir), "api_key": API_KEY, **SETTINGS}),
                name="secured",
                route_prefix="/secured",
            ),
        ]
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), "PNG")


def jpeg(seed: int = 0) -> bytes:
    return odd_image_bytes()["rgb.jpg"] if seed == 0 else encode(Image.open(io.BytesIO(png(seed))), "JPEG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def classify(
    url: str, data: object = None, media: str = "image/png", query: str = "", **kw: object
) -> requests.Response:
    """POST /v1/classify with `data` as the raw body of type `media`, or with requests' own kwargs."""
    headers = {"Content-Type": media} if data is not None else {}
    return requests.post(
        f"{url}/v1/classify{query}", data=data, headers=headers | kw.pop("headers", {}), timeout=60, **kw
    )


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 67-byte PNG whose header claims width x height pixels (a decompression bomb's header)."""
    small = encode(Image.new("L", (1, 1)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def assert_error(r: requests.Response, status: int, code: str, index: int | None = None) -> None:
    from rayimgcls.serve import ERROR_STATUS

    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and ERROR_STATUS[code] == status, body
    assert isinstance(body["error"], str) and body["error"]
    assert set(body) == ({"error", "code"} | ({"index"} if index is not None else set())), body
    assert body.get("index") == index


# ---------------------------------------------------------------------------------------------------------
# Routes and successful requests


def test_health_metadata_and_docs(url, model_dir):
    assert requests.get(f"{url}/v2/health/live", timeout=30).json() == {"status": "live"}
    assert requests.get(f"{url}/v2/health/ready", timeout=30).json() == {"status": "ready"}
    meta = requests.get(f"{url}/v1/model", timeout=30).json()
    card = read_card(model_dir)
    assert (meta["name"], meta["version"], meta["image_size"]) == (card.model_name, card.version, IMAGE_SIZE)
    assert meta["class_names"] == card.class_names and meta["multilabel"] is False
    assert meta["limits"]["max_body_bytes"] == SETTINGS["max_body_bytes"]
    assert meta["limits"]["max_pixels"] == SETTINGS["max_pixels"]
    assert meta["batching"]["max_batch_size"] == SETTINGS["max_batch_size"]
    docs = requests.get(f"{url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert "/v1/classify" in spec["paths"] and "/v2/health/ready" in spec["paths"]


def test_raw_png_and_jpeg(url, model_dir):
    card = read_card(model_dir)
    for data, media in ((png(), "image/png"), (jpeg(), "image/jpeg"), (png(), "application/octet-stream")):
        r = classify(url, data, media)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["version"]) == (card.model_name, card.version)
        [result] = body["results"]
        assert len(result["predictions"]) == NUM_CLASSES and abs(sum(result["predictions"]) - 1) < 1e-5
        assert len(result["top_k"]) == min(5, NUM_CLASSES) and "labels" not in result
        scores = [t["score"] for t in result["top_k"]]
        assert scores == sorted(scores, reverse=True)
        assert {t["label"] for t in result["top_k"]} <= set(card.class_names)
    assert len(classify(url, png(), query="?top_k=2").json()["results"][0]["top_k"]) == 2


def test_multipart_and_json_keep_request_order(url):
    images = [png(1), jpeg(2), png(3)]
    single = [classify(url, im).json()["results"][0]["predictions"] for im in images]
    r = requests.post(f"{url}/v1/classify?top_k=1", files=files(*images), timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3
    for got, want in zip(r.json()["results"], single, strict=True):
        np.testing.assert_allclose(got["predictions"], want, atol=1e-5)
        assert len(got["top_k"]) == 1
    data_url = "data:image/png;base64," + b64(images[0])
    doc = {"images": [{"b64": b64(images[2])}, {"b64": data_url}], "top_k": 3}
    r = requests.post(f"{url}/v1/classify?top_k=1", json=doc, timeout=60)  # the body's top_k wins
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    np.testing.assert_allclose(results[0]["predictions"], single[2], atol=1e-5)
    np.testing.assert_allclose(results[1]["predictions"], single[0], atol=1e-5)
    assert [len(x["top_k"]) for x in results] == [3, 3]
    form_top_k = requests.post(f"{url}/v1/classify", files=files(images[0]), data={"top_k": "2"}, timeout=60)
    assert len(form_top_k.json()["results"][0]["top_k"]) == 2


# ---------------------------------------------------------------------------------------------------------
# Bad input: every 4xx of §6, each with its code


def _truncated_jpeg() -> bytes:
    data = jpeg()
    return data[: len(data) // 2]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"


def raw(data: bytes, media: str = "image/png", params: object = None, **query: str) -> dict:
    """requests kwargs for a raw-body request (query parameters as keywords, or `params` as a list of pairs)."""
    return {"data": data, "headers": {"Content-Type": media}, "params": params or query}


def json_body(text: str) -> dict:
    """requests kwargs for a JSON body written by hand (what json= cannot send: huge numbers, odd nesting)."""
    return raw(text.encode(), "application/json")


def multipart(*images: bytes, boundary: str = "xYzZY", close: bool = True) -> dict:
    """requests kwargs for a multipart body written by hand; close=False leaves out the closing boundary, so the
    last part never ends (a client that stopped sending, or a proxy that cut the body)."""
    parts = b"".join(
        b"--%s\r\nContent-Disposition: form-data; name=file; filename=%d.png\r\nContent-Type: image/png\r\n\r\n%s\r\n"
        % (boundary.encode(), i, data)
        for i, data in enumerate(images)
    )
    body = parts + (b"--%s--\r\n" % boundary.encode() if close else b"")
    return raw(body, f"multipart/form-data; boundary={boundary}")


def tiff_that_raises_type_error() -> bytes:
    """A TIFF whose StripOffsets entry claims type DOUBLE: PIL's load() raises TypeError (not an OSError)."""
    tiff = encode(Image.new("L", (24, 20)), "TIFF")
    return tiff.replace(b"\x11\x01\x04\x00", b"\x11\x01\x0c\x00")


def solid_png(width: int, height: int) -> bytes:
    """A few KB on the wire, width x height pixels decoded."""
    return encode(Image.new("L", (width, height), 90), "PNG")


def one_b64(**extra: object) -> dict:
    return {"json": {"images": [{"b64": b64(png())}], **extra}}


BAD_REQUESTS = {  # name -> (requests kwargs, status, code, index of the bad image)
    "empty body": (raw(b""), 400, "empty_body", None),
    "non-image bytes": (raw(b"hello, this is not an image", "image/jpeg"), 415, "unsupported_format", 0),
    "truncated jpeg": (raw(_truncated_jpeg(), "image/jpeg"), 422, "truncated", 0),
    "jpeg magic, garbage after": (
        raw(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "image/jpeg"),
        422,
        "undecodable",
        0,
    ),
    "tga": (raw(encode(Image.new("RGB", (8, 8)), "TGA"), "image/x-tga"), 415, "unsupported_format", 0),
    "ico": (raw(encode(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon"), 415, "unsupported_format", 0),
    "eps": (raw(EPS, "application/octet-stream"), 415, "unsupported_format", 0),
    "decompression bomb": (raw(bomb_png()), 422, "too_many_pixels", 0),
    "over the pixel limit": (raw(encode(Image.new("1", (2100, 2000)), "PNG")), 422, "too_many_pixels", 0),
    "malformed json": (raw(b'{"images": [', "application/json"), 400, "malformed_json", None),
    "json of the wrong shape": ({"json": {"image": b64(png())}}, 400, "invalid_request", None),
    "json with an unknown key": (one_b64(topk=2), 400, "invalid_request", None),
    "json without images": ({"json": {"images": []}}, 400, "invalid_request", None),
    "bad base64": ({"json": {"images": [{"b64": b64(png())}, {"b64": "not*base64!"}]}}, 400, "bad_base64", 1),
    "top_k zero": (raw(png(), top_k="0"), 400, "bad_top_k", None),
    "top_k above the classes": (raw(png(), top_k=str(NUM_CLASSES + 1)), 400, "bad_top_k", None),
    "top_k not a number": (raw(png(), top_k="abc"), 400, "bad_top_k", None),
    "top_k a float in json": (one_b64(top_k=2.5), 400, "bad_top_k", None),
    "top_k a bool in json": (one_b64(top_k=True), 400, "bad_top_k", None),
    "top_k +-1": (raw(png(), top_k="+-1"), 400, "bad_top_k", None),
    "top_k a unicode digit": (raw(png(), top_k="\u00b3"), 400, "bad_top_k", None),
    "top_k of 5000 digits": (raw(png(), top_k="9" * 5000), 400, "bad_top_k", None),
    "top_k a float string": (raw(png(), top_k="2.0"), 400, "bad_top_k", None),
    "top_k negative": (raw(png(), top_k="-1"), 400, "bad_top_k", None),
    "top_k twice": (raw(png(), params=[("top_k", "1"), ("top_k", "2")]), 400, "bad_top_k", None),
    "top_k +-1 in a form": ({"files": files(png()), "data": {"top_k": "+-1"}}, 400, "bad_top_k", None),
    "top_k a unicode digit in a form": ({"files": files(png()), "data": {"top_k": "\u00b3"}}, 400, "bad_top_k", None),
    "top_k +-1 as a json string": (one_b64(top_k="+-1"), 400, "bad_top_k", None),
    "top_k negative in json": (one_b64(top_k=-2), 400, "bad_top_k", None),
    "top_k of 5000 digits in json": (
        json_body(f'{{"images": [{{"b64": "{b64(png())}"}}], "top_k": {"9" * 5000}}}'),
        400,
        "bad_top_k",
        None,
    ),
    "json nested 100,000 deep": (json_body("[" * 100_000), 400, "malformed_json", None),
    "json nested 50,000 deep and closed": (json_body("[" * 50_000 + "]" * 50_000), 400, "malformed_json", None),
    "json images counted before decoding": (
        {"json": {"images": [{"b64": "not*base64!"}] * (SETTINGS["max_images"] + 1)}},
        400,
        "too_many_images",
        None,
    ),
    "multipart without its closing boundary": (
        multipart(png(1), png(2), png(3), close=False),
        400,
        "malformed_multipart",
        None,
    ),
    "tiff whose decoder raises TypeError": (raw(tiff_that_raises_type_error(), "image/tiff"), 422, "undecodable", 0),
    "pixel budget of the request": (
        {"files": files(solid_png(2000, 1600), solid_png(2000, 1600))},
        413,
        "pixel_budget_exceeded",
        1,
    ),
    "text content type": (raw(b"hello", "text/plain"), 415, "unsupported_media_type", None),
    "form-urlencoded (curl -d)": (raw(png(), "application/x-www-form-urlencoded"), 415, "unsupported_media_type", None),
    "bad image inside a multi-image request": (
        {"files": files(png(1), png(2), _truncated_jpeg(), png(3))},
        422,
        "truncated",
        2,
    ),
    "empty file inside a multi-image request": ({"files": files(png(1), b"")}, 400, "empty_image", 1),
    "too many images": (
        {"files": files(*[png(i) for i in range(SETTINGS["max_images"] + 1)])},
        400,
        "too_many_images",
        None,
    ),
    "multipart, no boundary": (raw(b"--x\r\n", "multipart/form-data"), 400, "malformed_multipart", None),
    "image sent as a text field": ({"files": {"image": (None, "not a file")}}, 400, "invalid_request", None),
    "declared body over the limit": (raw(b"\xff\xd8\xff" + b"\0" * 300_000), 413, "body_too_large", None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_its_4xx_and_code(url, case):
    kwargs, status, code, index = BAD_REQUESTS[case]
    assert_error(requests.post(f"{url}/v1/classify", timeout=60, **kwargs), status, code, index)


def test_body_is_counted_as_it_arrives(url):
    """No Content-Length to go by (chunked): the ingress counts the bytes and stops at the limit."""
    chunks = (b"\0" * 10_000 for _ in range(30))
    assert_error(classify(url, chunks), 413, "body_too_large")


def test_content_length_lie_is_not_trusted(url):
    """A small Content-Length in front of a chunked body over the limit never reaches the model: the proxy's
    HTTP parser refuses the ambiguous framing outright."""
    port = int(url.rsplit(":", 1)[1])
    body = b"".join(b"%x\r\n%s\r\n" % (10_000, b"\0" * 10_000) for _ in range(30)) + b"0\r\n\r\n"
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        status = int(s.recv(4096).split(b" ", 2)[1])
    assert status in (400, 413)


def test_wrong_route_and_method(url):
    assert_error(requests.get(f"{url}/v1/nope", timeout=30), 404, "not_found")
    r = requests.get(f"{url}/v1/classify", timeout=30)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "POST"  # RFC 9110: a 405 says which methods the resource takes
    r = requests.delete(f"{url}/v2/health/live", timeout=30)
    assert_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers["Allow"]


def test_extreme_shapes_predict(url):
    """1 x 4,000,000 and 4,000,000 x 1 images (under the pixel limit, a few KB as PNG): resizing their shorter side
    to the model's resize target first would need 35 x 140 million pixels; only the centre crop is computed."""
    for size in ((1, 4_000_000), (4_000_000, 1)):
        r = classify(url, solid_png(*size))
        assert r.status_code == 200, (size, r.text)
        assert len(r.json()["results"][0]["predictions"]) == NUM_CLASSES


def test_classify_reports_server_timing(url):
    r = classify(url, png())
    assert r.status_code == 200
    timing = dict(part.strip().split(";", 1) for part in r.headers["Server-Timing"].split(","))
    assert set(timing) == {"decode", "model", "total"}
    durations = {k: float(v.rsplit("dur=", 1)[1]) for k, v in timing.items()}
    assert 0 <= durations["decode"] <= durations["total"] and 0 < durations["model"] <= durations["total"]


def test_openapi_says_what_the_server_takes(url):
    from rayimgcls.serve import ERROR_STATUS

    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    op = spec["paths"]["/v1/classify"]["post"]
    [param] = op["parameters"]
    assert (param["name"], param["in"]) == ("top_k", "query")
    assert param["schema"] == {"type": "integer", "minimum": 1, "maximum": NUM_CLASSES}
    content = op["requestBody"]["content"]
    taken = {"image/jpeg", "image/png", "application/octet-stream", "multipart/form-data", "application/json"}
    assert taken <= set(content)
    assert content["application/json"]["schema"]["properties"]["images"]["maxItems"] == SETTINGS["max_images"]
    assert {"200", "400", "408", "413", "415", "422", "500", "503"} <= set(op["responses"])
    assert "401" not in op["responses"]  # this app has no key
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"error", "code", "index"}
    assert set(error["properties"]["code"]["enum"]) == set(ERROR_STATUS)
    assert "Server-Timing" in op["responses"]["200"]["headers"]


@pytest.mark.timeout(120)
def test_bad_input_fails_only_its_own_request(url, ray_session):
    """Bad requests mixed with good ones, concurrently: every good one succeeds, every bad one gets its 4xx,
    nothing is a 5xx, no replica restarts, and the endpoint is still ready."""
    from ray import serve

    before = requests.get(f"{url}/v1/stats", timeout=30).json()
    cases = [kw for kw, _, _, _ in BAD_REQUESTS.values()]
    good = [{"data": png(i), "headers": {"Content-Type": "image/png"}} for i in range(len(cases))]
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda kw: requests.post(f"{url}/v1/classify", timeout=60, **kw).status_code,
                [kw for pair in zip(cases, good, strict=True) for kw in pair],
            )
        )
    assert codes[1::2] == [200] * len(good)
    assert all(400 <= c < 500 for c in codes[0::2]), codes
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
    after = requests.get(f"{url}/v1/stats", timeout=30).json()
    assert after["replica"] == before["replica"] and after["uptime_s"] >= before["uptime_s"]
    app = serve.status().applications["plain"]
    assert app.status == "RUNNING"
    assert all(d.replica_states == {"RUNNING": 1} for d in app.deployments.values()), app.deployments


# ---------------------------------------------------------------------------------------------------------
# Hostile clients: slow bodies, a model replica that dies under load


def _post_slowly(port: int, trickle_every_s: float | None, give_up_s: float = 40.0) -> tuple[int, float]:
    """POST a body announced as 1,000 bytes, then send one byte every `trickle_every_s` (None: nothing more) until
    the server answers -> (status, seconds until the answer)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as s:
        s.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\nConnection: close\r\n\r\n\x89"
        )
        s.settimeout(trickle_every_s or give_up_s)
        while time.monotonic() - start < give_up_s:
            try:
                head = s.recv(4096)
                return int(head.split(b" ", 2)[1]), time.monotonic() - start
            except TimeoutError:
                s.sendall(b"\0")
    raise AssertionError(f"no answer in {give_up_s} s")


@pytest.mark.timeout(120)
def test_slow_uploads_neither_starve_others_nor_hang(url):
    """40 clients announce a body and trickle a byte every 2 s: they hold ingress slots, not model slots, so a
    normal client is still answered at once; each trickler gets 408 at the total body deadline, and a client
    that stops sending gets 408 at the idle deadline."""
    port = int(url.rsplit(":", 1)[1])
    with ThreadPoolExecutor(41) as pool:
        slow = [pool.submit(_post_slowly, port, 2.0) for _ in range(40)]
        idle = pool.submit(_post_slowly, port, None)
        time.sleep(3)  # every slow request is inside the ingress by now
        start = time.monotonic()
        r = classify(url, png())
        took = time.monotonic() - start
        assert r.status_code == 200 and took < 5, (r.status_code, took)
        answers = [f.result() for f in slow]
        idle_status, idle_s = idle.result()
    assert [status for status, _ in answers] == [408] * 40
    assert all(SETTINGS["body_timeout_s"] - 1 <= s < SETTINGS["body_timeout_s"] + 10 for _, s in answers), answers
    assert idle_status == 408 and SETTINGS["body_idle_timeout_s"] - 1 <= idle_s < SETTINGS["body_timeout_s"], idle_s


@pytest.mark.timeout(240)
def test_model_replica_killed_under_load(url, model_dir):
    """SIGKILL the model replica while 16 clients keep sending: a call lost with the replica is retried once (Serve
    starts a new replica within seconds), else answered 503 with Retry-After; never a 500."""
    from ray import serve

    from rayimgcls.serve import build_app

    serve.run(build_app({"model_dir": str(model_dir), **SETTINGS}), name="fragile", route_prefix="/fragile")
    base = f"{url}/fragile"
    try:
        pid = requests.get(f"{base}/v1/stats", timeout=30).json()["pid"]
        answers: list[requests.Response] = []

        def client(seed: int) -> None:
            for i in range(6):
                answers.append(classify(base, png(seed * 10 + i)))

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client, seed) for seed in range(16)]
            time.sleep(1.5)
            os.kill(pid, signal.SIGKILL)
            for f in futures:
                f.result()
        statuses = sorted({r.status_code for r in answers})
        assert set(statuses) <= {200, 503}, [(r.status_code, r.text[:200]) for r in answers if r.status_code >= 500]
        assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 503)
        assert sum(r.status_code == 200 for r in answers) > len(answers) // 2
        deadline = time.monotonic() + 120
        while requests.get(f"{base}/v1/stats", timeout=60).json().get("pid") in (pid, None):
            assert time.monotonic() < deadline, "Serve did not replace the killed replica"
            time.sleep(1)
        assert classify(base, png()).status_code == 200
    finally:
        serve.delete("fragile")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("app", ["plain", "secured"])
def test_schemathesis_finds_nothing(url, app, model_dir, multilabel_model_dir):
    """Schema-driven fuzzing with every check (5xx, schema and status conformance, 405 + Allow, auth, ...): requests
    generated from our OpenAPI document, answered as the document says. schemathesis.toml (repository root)
    declares the documented 4xx of /v1/classify and of the protocol's infer as expected for schema-valid bodies
    that are not images, and where the model's name and version come from."""
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or "st"
    base, headers = (f"{url}/secured", ["-H", f"Authorization: Bearer {API_KEY}"]) if app == "secured" else (url, [])
    card = read_card(multilabel_model_dir if app == "secured" else model_dir)
    env = os.environ | {"RAYIMGCLS_MODEL_NAME": card.model_name, "RAYIMGCLS_MODEL_VERSION": card.version}
    cmd = [st, "--no-color", "run", "--checks", "all", "--max-examples", "50", "--seed", "1", *headers]
    run = subprocess.run([*cmd, f"{base}/openapi.json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    assert run.returncode == 0 and " passed" in summary and " failed" not in summary, run.stdout[-5000:]


# ---------------------------------------------------------------------------------------------------------
# Batching, API key, multi-label


@pytest.mark.timeout(120)
def test_concurrent_requests_are_batched(url):
    def count(stats: dict) -> dict[int, int]:
        return {int(k): v for k, v in stats["batch_sizes"].items()}

    before = count(requests.get(f"{url}/v1/stats", timeout=30).json())
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: classify(url, png(i)), range(48)))
    assert [r.status_code for r in responses] == [200] * 48
    after = count(requests.get(f"{url}/v1/stats", timeout=30).json())
    new = {n: after[n] - before.get(n, 0) for n in after if after[n] > before.get(n, 0)}
    assert sum(n * c for n, c in new.items()) == 48  # every image went through exactly one model call
    assert max(new) > 1, f"no batch larger than 1 under concurrent load: {new}"
    assert max(new) <= SETTINGS["max_batch_size"]


def test_the_batch_wait_holds_no_lone_call(url, model_dir):
    """In a replica of its own, with a 2 s batch wait: a lone call still starts its batch at once, and calls that
    find others in flight wait for their batch to fill (all four in one batch, after about the wait)."""
    from ray import serve

    from rayimgcls.serve.deployments import BatchedModel

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Probe(BatchedModel):  # defined here: Ray ships it by value to the replica
        async def timings(self) -> tuple[float, float, dict[int, int]]:
            image = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)

            async def timed(calls: int) -> float:
                start = time.perf_counter()
                await asyncio.gather(*(self.predict(image) for _ in range(calls)))
                return time.perf_counter() - start

            return await timed(1), await timed(4), dict(self.batch_sizes)

    options = {"use_gpu": False, "precision": "fp32", "torch_threads": 1, "max_concurrent_batches": 1}
    probe = Probe.bind(str(model_dir), max_batch_size=8, batch_wait_timeout_s=2.0, **options)
    handle = serve.run(probe, name="probe", route_prefix=None)
    try:
        # From a thread of its own: the session's browser (Playwright's sync API) may hold an event loop here
        with ThreadPoolExecutor(1) as pool:
            lone, four, sizes = pool.submit(lambda: handle.timings.remote().result(timeout_s=60)).result()
    finally:
        serve.delete("probe")
    assert lone < 1.0, f"a lone call waited {lone:.2f} s"
    assert four >= 1.5 and sizes == {1: 1, 4: 1}, (four, sizes)


def test_serve_processes_run_in_throughput_mode(url, ray_session):
    """`rayimgcls serve` (and this session, as conftest starts Ray) give Serve's processes THROUGHPUT_ENV: the
    proxy and both deployments' replicas start with it in their environment, which Serve reads at import."""
    from ray.util.state import list_actors

    from rayimgcls.serve.application import THROUGHPUT_ENV

    gcs = ray_session.get_runtime_context().gcs_address  # this session's Ray, whichever others run
    actors = list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=1000)
    serve_actors = {a.class_name: a.pid for a in actors if a.class_name == "ProxyActor" or "Replica" in a.class_name}
    assert any("Ingress" in name for name in serve_actors) and any("ModelServer" in name for name in serve_actors)
    for name, pid in serve_actors.items():
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
        )
        assert THROUGHPUT_ENV.items() <= environ.items(), name


def test_api_key(url):
    """Probes and the API's description answer without the key (load balancers and KubeRay send none); every
    route that touches the model needs it."""
    secured = f"{url}/secured"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs"):
        assert requests.get(secured + path, timeout=30).status_code == 200, path
    for path in ("/v1/model", "/v1/stats"):
        r = requests.get(secured + path, timeout=30)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert requests.get(secured + path, headers=auth, timeout=30).status_code == 200, path
    assert_error(classify(secured, png()), 401, "unauthorized")
    assert_error(classify(secured, png(), headers={"Authorization": "Bearer wrong-key"}), 401, "unauthorized")
    assert_error(classify(secured, png(), headers={"Authorization": API_KEY}), 401, "unauthorized")
    assert classify(secured, png(), headers=auth).status_code == 200
    assert "/secured/openapi.json" in requests.get(f"{secured}/docs", timeout=30).text
    spec = requests.get(f"{secured}/openapi.json", timeout=30).json()
    assert spec["servers"] == [{"url": "/secured"}]
    assert "401" in spec["paths"]["/v1/classify"]["post"]["responses"]
    assert requests.get(f"{url}/v1/model", timeout=30).status_code == 200  # the other app has no key


def test_multilabel_results_have_labels(url, multilabel_model_dir):
    card = read_card(multilabel_model_dir)
    r = classify(f"{url}/secured", png(), headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    above = zip(card.class_names, result["predictions"], card.thresholds, strict=True)
    assert result["labels"] == [name for name, p, threshold in above if p >= threshold]
    assert all(0 <= p <= 1 for p in result["predictions"])


# ---------------------------------------------------------------------------------------------------------
# Same answers as the Python API


def test_http_matches_python_api(url, model_dir, odd_images):
    paths = sorted((odd_images / "images").iterdir())
    expected = Predictor.from_dir(model_dir, precision="fp32").predict(paths, top_k=NUM_CLASSES)
    for path, want in zip(paths, expected, strict=True):
        r = classify(url, path.read_bytes(), MEDIA[path.suffix], query=f"?top_k={NUM_CLASSES}")
        assert r.status_code == 200, (path.name, r.text)
        got = r.json()["results"][0]
        np.testing.assert_allclose(got["predictions"], want["predictions"], atol=1e-5, err_msg=path.name)
        assert [t["index"] for t in got["top_k"]] == [t["index"] for t in want["top_k"]]
    form = [("file", (p.name, p.read_bytes(), MEDIA[p.suffix])) for p in paths]
    together = requests.post(f"{url}/v1/classify", files=form, timeout=60).json()["results"]
    for path, got, want in zip(paths, together, expected, strict=True):
        np.testing.assert_allclose(got["predictions"], want["predictions"], atol=1e-5, err_msg=path.name)


# ---------------------------------------------------------------------------------------------------------
# Building the application; the serve config; refusals before anything starts


def test_build_app_checks_its_args(model_dir):
    from rayimgcls.serve import build_app

    with pytest.raises(ConfigError, match="did you mean 'max_batch_size'"):
        build_app({"model_dir": str(model_dir), "max_batch_sise": 8})
    with pytest.raises(ConfigError, match="max_batch_size=0"):
        build_app({"model_dir": str(model_dir), "max_batch_size": "0"})
    with pytest.raises(ConfigError, match="max_ongoing_requests=4"):
        build_app({"model_dir": str(model_dir), "max_batch_size": 8, "max_ongoing_requests": 4})
    with pytest.raises(ModelError, match="not a model directory"):
        build_app({"model_dir": str(model_dir.parent / "missing")})


@pytest.mark.timeout(120)
def test_serve_build_writes_the_deployment_options(model_dir, tmp_path):
    """`serve build` (which needs an Application: `rayimgcls.serve:app`) writes what Serve will enforce:
    batches can fill on both deployments, fractional CPUs, autoscaling under its current key names."""
    out = tmp_path / "built.yaml"
    env = os.environ | {"RAYIMGCLS_MODEL_DIR": str(model_dir)}
    serve_cli = shutil.which("serve", path=os.path.dirname(sys.executable)) or "serve"
    run = subprocess.run(
        [serve_cli, "build", "rayimgcls.serve:app", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    [app] = yaml.safe_load(out.read_text())["applications"]
    deployments = {d["name"]: d for d in app["deployments"]}
    defaults = ServeConfig(model_dir=str(model_dir))
    for name in ("Ingress", "ModelServer"):
        assert deployments[name]["max_ongoing_requests"] >= defaults.max_batch_size
    model = deployments["ModelServer"]
    assert model["ray_actor_options"]["num_cpus"] == defaults.num_cpus < 1
    assert set(model["autoscaling_config"]) >= {
        "min_replicas",
        "max_replicas",
        "target_ongoing_requests",
        "upscale_delay_s",
        "downscale_delay_s",
    }


def test_use_gpu_without_a_gpu_is_refused_at_once(ray_session, model_dir):
    from rayimgcls.runtime import ResourceError
    from rayimgcls.serve import build

    if ray_session.cluster_resources().get("GPU", 0):
        pytest.skip("this machine has a GPU")
    with pytest.raises(ResourceError, match="GPU"):
        build(ServeConfig(model_dir=str(model_dir), use_gpu=True))


def test_cluster_serve_config_deploys_the_builder(model_dir):
    from ray.serve.schema import ServeDeploySchema

    from rayimgcls.serve import build_app

    text = (ROOT / "cluster" / "serve_config.yaml").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.http_options.host == "0.0.0.0" and "on purpose" in text
    [app] = config.applications
    assert app.import_path == "rayimgcls.serve:build_app" and "api_key" not in app.args
    assert build_app({**app.args, "model_dir": str(model_dir)}) is not None


def test_app_attribute_for_serve_build(model_dir, monkeypatch):
    import rayimgcls.serve as module

    monkeypatch.delenv("RAYIMGCLS_MODEL_DIR", raising=False)
    with pytest.raises(ConfigError, match="RAYIMGCLS_MODEL_DIR"):
        module.app  # noqa: B018 - the lookup is the test
    monkeypatch.setenv("RAYIMGCLS_MODEL_DIR", str(model_dir))
    assert module.app is not None


@pytest.mark.timeout(120)
def test_import_starts_nothing_and_skips_training_code():
    code = (
        "import sys, ray, rayimgcls.serve, rayimgcls.cli; "
        "assert not ray.is_initialized(); "
        "assert 'rayimgcls.train' not in sys.modules, 'serving imported the training code'; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cli_refuses_bad_settings_before_starting_anything(model_dir, tmp_path, monkeypatch):
    from rayimgcls.cli import app

    monkeypatch.delenv("RAYIMGCLS_API_KEY", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--model-dir", str(model_dir), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "without an API key" in r.output and "--allow-no-key" in r.output, r.output
    r = runner.invoke(app, ["serve", "--model-dir", str(tmp_path)])
    assert r.exit_code == 2 and "not a model directory" in r.output
    r = runner.invoke(app, ["serve", "--model-dir", str(model_dir), "--max-batch-size", "0", "--port", "0"])
    assert r.exit_code == 2 and "max_batch_size=0" in r.output and "port=0" in r.output, r.output
    config = tmp_path / "serve.yaml"
    config.write_text(f"model_dir: {model_dir}\nmax_replica: 3\n")
    r = runner.invoke(app, ["serve", "--config", str(config)])
    assert r.exit_code == 2 and "did you mean 'max_replicas'" in r.output, r.output


def test_port_in_use_is_refused_with_the_address(model_dir):
    from rayimgcls.serve import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)


# ---------------------------------------------------------------------------------------------------------
# `rayimgcls serve` as a user runs it: its own Ray, a free port, Ctrl-C


def _wait_ready(proc: subprocess.Popen, base: str, headers: dict, log: Path, timeout: float) -> None:
    """Until the endpoint is ready and the command has said where it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rayimgcls serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            ready = requests.get(f"{base}/v2/health/ready", headers=headers, timeout=10).status_code == 200
            if ready and f"at {base}/v1/classify" in log.read_text():
                return
        except requests.RequestException:  # not listening yet, or the proxy holds the request while starting
            pass
        time.sleep(1)
    raise AssertionError(f"not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(300)
def test_cli_serve_end_to_end(model_dir, tmp_path):
    port = free_port()
    base, key = f"http://127.0.0.1:{port}", "e2e-key-42"
    headers = {"Authorization": f"Bearer {key}"}
    exe = shutil.which("rayimgcls", path=os.path.dirname(sys.executable))
    cmd = ([exe] if exe else [sys.executable, "-m", "rayimgcls"]) + [
        "serve",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--num-cpus",
        "0.5",
        "--max-batch-size",
        "4",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAYIMGCLS_API_KEY": key}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(proc, base, headers, log, timeout=200)
        for data, media in ((png(), "image/png"), (jpeg(), "image/jpeg")):
            r = classify(base, data, media, headers=headers)
            assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
        r = classify(base, files=files(png(1), png(2)), headers=headers)
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
        r = classify(base, json={"images": [{"b64": b64(jpeg())}], "top_k": 1}, headers=headers)
        assert r.status_code == 200 and len(r.json()["results"][0]["top_k"]) == 1, r.text
        assert_error(requests.get(f"{base}/v1/model", timeout=30), 401, "unauthorized")  # key from the env
        bad_gif = classify(base, b"GIF89a-not-really", "image/gif", headers=headers)
        assert_error(bad_gif, 422, "undecodable", 0)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            returncode = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    output = log.read_text()
    assert returncode == 0, f"exit code {returncode}:\n{output[-3000:]}"
    assert "serving" in output and "stopping" in output, output[-3000:]
    assert "Traceback" not in output, output[output.index("Traceback") - 500 :][:3000]
    with socket.socket() as s:  # the HTTP port is free again: Serve's proxy went with it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
