"""The Open Inference Protocol v2 over real HTTP, spoken by Triton's own client (tritonclient[http]): health,
metadata, readiness, inference with BYTES and UINT8 inputs in binary and JSON, the classification extension,
multi-label labels, the API key; and every malformed request a 400 (or the limit's own status) in the protocol's
{"error": message} form. The probabilities equal /v1/classify's for the same file."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from conftest import NUM_CLASSES
from test_serve import API_KEY, SETTINGS, classify, png, url  # noqa: F401 - url: the module's Serve instance

from rayimgcls.card import read_card

tritonclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def client(url) -> Iterator[object]:  # noqa: F811 - the fixture imported above
    c = tritonclient.InferenceServerClient(url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def secured_client(url) -> Iterator[object]:  # noqa: F811
    c = tritonclient.InferenceServerClient(url.removeprefix("http://") + "/secured")
    yield c
    c.close()


def name_of(model_dir) -> str:
    return read_card(model_dir).model_name


def v1_probs(base: str, data: bytes, **kw) -> np.ndarray:
    r = classify(base, data, query=f"?top_k={NUM_CLASSES}", **kw)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["results"][0]["predictions"])


def bytes_input(images: list[bytes], binary: bool, shape: list[int] | None = None):
    tensor = tritonclient.InferInput("image", shape or [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(x).decode() for x in images]  # JSON: base64 strings
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_).reshape(shape or [len(images)]), binary_data=binary)
    return tensor


def test_health_metadata_and_readiness(client, model_dir):
    from rayimgcls import __version__

    name, version = name_of(model_dir), read_card(model_dir).version
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "rayimgcls" and meta["version"] == __version__
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert client.is_model_ready(name) and client.is_model_ready(name, version)
    model = client.get_model_metadata(name)
    assert model["name"] == name and model["versions"] == [version]
    assert {(t["name"], t["datatype"]) for t in model["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, NUM_CLASSES]}]
    assert "base64" in model["parameters"]["inputs"]  # how JSON carries a BYTES element
    assert client.get_model_metadata(name, version)["name"] == name
    for call in (lambda: client.get_model_metadata("nope"), lambda: client.get_model_metadata(name, "v0")):
        with pytest.raises(InferenceServerException, match="unknown|no version"):
            call()
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_v1_for_bytes_and_pixels(client, url, model_dir, binary):  # noqa: F811
    import io

    from PIL import Image

    name = name_of(model_dir)
    files = [png(11), png(12, (64, 20))]
    want = np.stack([v1_probs(url, f) for f in files])
    result = client.infer(
        name,
        [bytes_input(files, binary)],
        outputs=[tritonclient.InferRequestedOutput("probabilities", binary_data=binary)],
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)
    column = client.infer(name, [bytes_input(files, binary, [2, 1])])  # [N, 1] and the default outputs
    np.testing.assert_allclose(column.as_numpy("probabilities"), want, atol=1e-5)
    pixels = np.asarray(Image.open(io.BytesIO(files[0])).convert("RGB"))[None]
    tensor = tritonclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    got = client.infer(name, [tensor], outputs=[tritonclient.InferRequestedOutput("probabilities", binary_data=binary)])
    np.testing.assert_allclose(got.as_numpy("probabilities")[0], want[0], atol=1e-5)


def test_classification_extension(client, url, model_dir):  # noqa: F811
    card = read_card(model_dir)
    want = v1_probs(url, png(3))
    for binary in (True, False):
        out = tritonclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)
        cells = client.infer(card.model_name, [bytes_input([png(3)], binary)], outputs=[out]).as_numpy("probabilities")
        assert cells.shape == (1, 2)
        order = np.argsort(-want, kind="stable")[:2]
        for cell, index in zip(cells[0], order, strict=True):
            score, i, label = (cell.decode() if isinstance(cell, bytes) else cell).split(":", 2)
            assert (int(i), label) == (index, card.class_names[index])
            assert abs(float(score) - want[index]) < 1e-5


def test_multilabel_labels_and_the_api_key(secured_client, url, multilabel_model_dir):  # noqa: F811
    card = read_card(multilabel_model_dir)

    def auth() -> dict[str, str]:  # a new dict per call: tritonclient adds its own headers to the one it is given
        return {"Authorization": f"Bearer {API_KEY}"}

    with pytest.raises(InferenceServerException, match="API key"):
        secured_client.get_model_metadata(card.model_name)
    assert secured_client.is_server_live()  # probes need no key
    meta = secured_client.get_model_metadata(card.model_name, headers=auth())
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "labels"]
    result = secured_client.infer(card.model_name, [bytes_input([png(5)], True)], headers=auth())
    probs = result.as_numpy("probabilities")[0]
    [labels] = result.as_numpy("labels")
    above = [n for n, p, t in zip(card.class_names, probs, card.thresholds, strict=True) if p >= t]
    assert json.loads(labels) == above
    np.testing.assert_allclose(probs, v1_probs(f"{url}/secured", png(5), headers=auth()), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Malformed requests, written by hand


def infer_body(inputs: list[dict], outputs: list[dict] | None = None, binary: bytes = b"", **extra) -> dict:
    """requests kwargs for an infer request: a JSON header, and binary tensors after it when given."""
    header = json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {}), **extra}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return {"data": header + binary, "headers": headers}


def b64_input(*images: bytes, **kw) -> dict:
    return {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(images)],
        "data": [base64.b64encode(x).decode() for x in images],
        **kw,
    }


def framed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in elements)


IMG = png(1)
BAD = {  # name -> (requests kwargs, status, words the error must contain)
    "wrong datatype": (infer_body([{**b64_input(IMG), "datatype": "FP32"}]), 400, "datatype"),
    "unknown input": (infer_body([{**b64_input(IMG), "name": "x"}]), 400, "unknown"),
    "shape [N, 2]": (infer_body([{**b64_input(IMG, IMG), "shape": [1, 2]}]), 400, "shape"),
    "negative dimension": (infer_body([{**b64_input(IMG), "shape": [-1]}]), 400, "negative"),
    "overflowing dimension": (
        infer_body([{"name": "pixels", "datatype": "UINT8", "shape": [1, 2**40, 2**40, 3], "data": [0]}]),
        400,
        "overflowing",
    ),
    "shape says more than the data": (infer_body([{**b64_input(IMG), "shape": [3]}]), 400, "element"),
    "pixels count off by one": (
        infer_body([{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 11}]),
        400,
        "12",
    ),
    "pixels out of range": (
        infer_body([{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, 256, 1]}]),
        400,
        "0..255",
    ),
    "binary sizes do not add up": (
        infer_body(
            [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(framed(IMG))},
                }
            ],
            binary=framed(IMG) + b"trailing bytes",
        ),
        400,
        "binary section",
    ),
    "element longer than its binary_data_size": (
        infer_body(
            [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10}}],
            binary=framed(IMG),
        ),
        400,
        "claims",
    ),
    "binary size past the body": (
        infer_body(
            [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10**9}}],
            binary=framed(IMG),
        ),
        400,
        "binary",
    ),
    "header length past the body": (
        {"data": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "9999"}},
        400,
        "past the end",
    ),
    "header length not a number": (
        {"data": b'{"inputs": []}', "headers": {"Inference-Header-Content-Length": "-3"}},
        400,
        "byte count",
    ),
    "element length prefix cut off": (
        infer_body(
            [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}],
            binary=b"\x05\x00",
        ),
        400,
        "cut-off",
    ),
    "duplicate inputs": (infer_body([b64_input(IMG), b64_input(IMG)]), 400, "exactly one input"),
    "unknown output": (infer_body([b64_input(IMG)], [{"name": "logits"}]), 400, "unknown"),
    "output twice": (
        infer_body([b64_input(IMG)], [{"name": "probabilities"}, {"name": "probabilities"}]),
        400,
        "twice",
    ),
    "classification of 0 classes": (
        infer_body([b64_input(IMG)], [{"name": "probabilities", "parameters": {"classification": NUM_CLASSES + 1}}]),
        400,
        "classification",
    ),
    "too many images": (infer_body([b64_input(*[IMG] * (SETTINGS["max_images"] + 1))]), 400, "at most"),
    "not an image, named by index": (infer_body([b64_input(IMG, b"GIF89a nope")]), 400, "image 1"),
    "bad base64": (infer_body([b64_input(IMG, data=["%%%"])]), 400, "base64"),
    "not JSON": ({"data": b"{inputs"}, 400, "JSON"),
    "JSON nested 100,000 deep": ({"data": b"[" * 100_000}, 400, "nested"),
    "body over the byte limit": ({"data": b"x" * (SETTINGS["max_body_bytes"] + 1)}, 413, "limit"),
    "gzip body": ({"data": b"x", "headers": {"Content-Encoding": "gzip"}}, 415, "Content-Encoding"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_infer_requests_are_refused_in_the_protocols_form(url, model_dir, case):  # noqa: F811
    kwargs, status, words = BAD[case]
    r = requests.post(f"{url}/v2/models/{name_of(model_dir)}/infer", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"], r.json()


def test_unknown_model_or_version_is_404_in_the_protocols_form(url, model_dir):  # noqa: F811
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{name_of(model_dir)}/versions/v0"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 404 and set(r.json()) == {"error"}, (path, r.text)
    r = requests.post(f"{url}/v2/models/nope/infer", data=b"{}", timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"}
