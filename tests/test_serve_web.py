"""The classify page and /docs in a real browser (headless Chromium via Playwright), against a running app:
nothing fetched off the loopback (the page fixture fails the test otherwise), the page's answer equals
/v1/classify's, errors read as the server's sentences, class names are shown as text, a phone-sized window works;
and the page's files reach a non-editable install (the wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import encode, screenshot
from PIL import Image
from test_serve import API_KEY, SETTINGS, classify, png, url  # noqa: F401 - url: the module's Serve instance

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def hostile_url(url, tmp_path_factory):  # noqa: F811
    """An app whose model has a class name that is an HTML payload."""
    from conftest import TINY_VIT
    from ray import serve

    from rayimgcls.model import make_untrained_model_dir
    from rayimgcls.serve import build_app

    model = tmp_path_factory.mktemp("hostile") / "model"
    make_untrained_model_dir(model, num_classes=2, image_size=32, class_names=[HOSTILE, "plain"], model_kwargs=TINY_VIT)
    serve.run(build_app({"model_dir": str(model), **SETTINGS}), name="hostile", route_prefix="/hostile")
    yield f"{url}/hostile"
    serve.delete("hostile")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def results(page, count: int) -> list[dict]:
    page.wait_for_function(f"document.querySelectorAll('.result').length >= {count}", timeout=60_000)
    return page.eval_on_selector_all(
        ".result",
        "cards => cards.map(c => ({title: c.querySelector('h2').textContent,"
        " names: [...c.querySelectorAll('.bars .name')].map(n => n.textContent),"
        " scores: [...c.querySelectorAll('.bars .score')].map(n => parseFloat(n.textContent)),"
        " loaded: c.querySelector('img').naturalWidth > 0}))",
    )


@pytest.mark.timeout(180)
def test_page_classifies_a_dropped_file_like_the_api(page, url, tmp_path):  # noqa: F811
    page.goto(f"{url}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    image = write(tmp_path, "cat.png", png(21, (60, 45)))
    page.set_input_files("#files", str(image))
    [card] = results(page, 1)
    want = classify(url, image.read_bytes()).json()["results"][0]["top_k"]
    assert card["title"] == "cat.png" and card["loaded"]
    assert card["names"] == [t["label"] for t in want]
    assert card["scores"] == pytest.approx([round(t["score"], 3) for t in want], abs=1e-3)
    status = page.text_content("#status")
    assert "decode" in status and "queue + model" in status  # from the Server-Timing header
    broken = write(tmp_path, "broken.png", png(2)[:200])
    page.set_input_files("#files", str(broken))
    page.wait_for_selector("#status.error")
    assert page.text_content("#status").startswith(
        "broken.png: cannot decode PNG"
    ) and "truncated" in page.text_content("#status")
    screenshot(page, "classify-page")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "classify-page-phone")


@pytest.mark.timeout(180)
def test_page_with_an_api_key_and_a_hostile_class_name(page, url, hostile_url, tmp_path):  # noqa: F811
    page.goto(f"{url}/secured/")
    page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
    page.fill("#key", API_KEY)
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    page.set_input_files("#files", str(write(tmp_path, "a.png", png(4))))
    [card] = results(page, 1)
    assert len(card["names"]) == 4 and page.locator(".threshold").count() == 4  # multi-label thresholds marked
    page.goto(f"{hostile_url}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    page.set_input_files("#files", str(write(tmp_path, "b.png", encode(Image.new("RGB", (32, 32)), "PNG"))))
    [card] = results(page, 1)
    assert HOSTILE in card["names"]  # shown as text
    assert page.title() != "pwned" and page.locator(".bars img").count() == 0


@pytest.mark.timeout(120)
def test_docs_render_offline(page, url):  # noqa: F811
    page.goto(f"{url}/docs")
    page.wait_for_selector(".opblock", timeout=60_000)
    shown = page.eval_on_selector_all(".opblock-summary-path", "ps => ps.map(p => p.textContent)")
    assert "/v1/classify" in shown and "/v2/models/{name}/infer" in shown
    screenshot(page, "docs")


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_page(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    [wheel] = tmp_path.glob("rayimgcls-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"rayimgcls/serve/web/{f}" for f in ("index.html", "app.js", "style.css")} <= names
