"""serve/http.py without a server: top_k in every form, multipart fed byte by byte, JSON of any shape, the body
memory budget. The same classes are tested over real HTTP in test_serve.py; these pin the parsing itself."""

from __future__ import annotations

import pytest
from conftest import encode
from PIL import Image

from rayimgcls.serve.http import ApiError, BodyBudget, FormImages, check_pixels, json_images, parse_top_k

BAD_TOP_K = ["+-1", "\u00b3", "\u0663", "9" * 5000, "2.0", "-1", "0", "", " ", True, 2.0, -3, [3]]


@pytest.mark.parametrize("value", BAD_TOP_K)
def test_bad_top_k_in_any_form_is_a_400(value):
    with pytest.raises(ApiError) as e:
        parse_top_k(value, 10)
    assert e.value.code == "bad_top_k" and len(e.value.message) < 200


@pytest.mark.parametrize("value,k", [(None, 5), ("3", 3), (" 3 ", 3), ("+3", 3), (10, 10), ("10", 10)])
def test_good_top_k(value, k):
    assert parse_top_k(value, 10) == k


def _form(*images: bytes, boundary: bytes = b"B0uNd", close: bool = True) -> bytes:
    parts = b"".join(
        b"--%s\r\nContent-Disposition: form-data; name=file; filename=%d.png\r\n\r\n%s\r\n" % (boundary, i, data)
        for i, data in enumerate(images)
    )
    return parts + (b"--%s--\r\n" % boundary if close else b"")


def test_multipart_parts_survive_any_chunking_and_must_close():
    images = [b"\x89PNG first", b"second\r\n--B0uNd-not-a-boundary", b""]
    body = _form(*images)
    form = FormImages("multipart/form-data; boundary=B0uNd", max_images=8)
    for i in range(len(body)):  # one byte at a time: the worst a network can do
        form.feed(body[i : i + 1])
    assert form.finish() == (images, None)
    cut = FormImages("multipart/form-data; boundary=B0uNd", max_images=8)
    cut.feed(_form(*images, close=False))
    with pytest.raises(ApiError) as e:
        cut.finish()
    assert e.value.code == "malformed_multipart" and "closing boundary" in e.value.message


def test_multipart_refuses_the_part_past_max_images_as_it_arrives():
    form = FormImages("multipart/form-data; boundary=B0uNd", max_images=2)
    with pytest.raises(ApiError) as e:
        form.feed(_form(b"a", b"b", b"c"))
    assert e.value.code == "too_many_images"
    assert len(form.images) == 2  # the third part's data was never collected


def test_json_counts_images_before_decoding_and_survives_any_number():
    with pytest.raises(ApiError) as e:
        json_images(b'{"images": [' + b",".join([b'{"b64": "!"}'] * 9) + b"]}", max_images=8)
    assert e.value.code == "too_many_images"
    images, top_k = json_images(b'{"images": [{"b64": "aGk="}], "top_k": ' + b"9" * 5000 + b"}", max_images=8)
    assert images == [b"hi"]
    with pytest.raises(ApiError) as e:
        parse_top_k(top_k, 10)
    assert e.value.code == "bad_top_k"


def test_pixel_budget_names_the_image_that_crosses_it():
    small, big = encode(Image.new("L", (100, 100)), "PNG"), encode(Image.new("L", (1000, 1000)), "PNG")
    check_pixels([small, big], max_pixels=2_000_000, budget=1_010_000)
    with pytest.raises(ApiError) as e:
        check_pixels([small, big, small], max_pixels=2_000_000, budget=1_000_000)
    assert (e.value.code, e.value.status, e.value.index) == ("pixel_budget_exceeded", 413, 1)


def test_body_budget_caps_the_sum_of_bodies_in_memory():
    budget = BodyBudget(100)
    first, second = budget.lease(), budget.lease()
    first.take(60)
    with pytest.raises(ApiError) as e:
        second.take(50)
    assert (e.value.code, e.value.status) == ("unavailable", 503)
    first.release()
    second.take(50)
    assert budget.used == 50
