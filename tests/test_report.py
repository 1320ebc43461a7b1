"""report.html of `rayimgcls evaluate`: real result dirs from `run_inference`, opened in a real browser.

The dataset carries a hostile class name and a `</script>` in an image path (the CSV is user input), a
missing and a truncated image (error rows) and an image deleted after inference (a placeholder picture).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import IMAGE_SIZE, TINY_VIT, screenshot
from typer.testing import CliRunner

from rayimgcls.cli import app
from rayimgcls.config import InferConfig
from rayimgcls.evaluate import evaluate
from rayimgcls.infer import run_inference
from rayimgcls.model import make_untrained_model_dir
from rayimgcls.report.evaluation import MAX_THUMBNAILS, multi_hot
from rayimgcls.report.html import CSP, esc, file_url
from rayimgcls.report.thumbnails import placeholder, thumbnail, thumbnails

HOSTILE = "<img src=x onerror=alert(1)>"
NAMES = ["circle", HOSTILE, "tri$angle$ \\frac", "cross"]  # `$`: not matplotlib mathtext either
SCRIPT_DIR = "images/</script><script>alert(2)</script>"  # a folder name, so the path holds a `</script>`
ROWS = 24


def _make_root(shapes_root: Path, out: Path) -> Path:
    """ROWS rows of the shapes dataset with hostile names, plus a missing and a truncated image."""
    root = out / "data"
    lines = (shapes_root / "labels.csv").read_text().splitlines()[1 : ROWS + 1]
    rows = []
    for i, line in enumerate(lines):
        path, label, _subset, _meta = line.split(",")
        target = f"{SCRIPT_DIR}/{Path(path).name}" if i == 0 else path
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes_root / path, root / target)
        rows.append(f"{target},{label},test")
    (root / "images" / "truncated.png").write_bytes((shapes_root / "images" / "000001.png").read_bytes()[:60])
    rows += ["images/missing.jpg,0,test", "images/truncated.png,1,test"]
    (root / "labels.csv").write_text("image_path,label,subset\n" + "\n".join(rows) + "\n")
    (root / "class_to_idx.json").write_text(json.dumps({n: i for i, n in enumerate(NAMES)}))
    return root


@pytest.fixture(scope="module")
def hostile_result(ray_session, shapes_root, tmp_path_factory) -> tuple[Path, dict]:
    """A multi-class result dir of real inference, evaluated (report.html written)."""
    base = tmp_path_factory.mktemp("report")
    root = _make_root(shapes_root, base)
    model = base / "model"
    make_untrained_model_dir(model, num_classes=4, image_size=IMAGE_SIZE, class_names=NAMES, model_kwargs=TINY_VIT)
    out = base / "result"
    run_inference(InferConfig(model_dir=str(model), data_root=str(root), result_dir=str(out), csv="labels.csv"))
    gone = (root / "labels.csv").read_text().splitlines()[3].split(",")[0]
    (root / gone).unlink()  # predicted, then gone: its picture becomes a placeholder
    return out, evaluate(str(out), worst=ROWS)


@pytest.fixture(scope="module")
def multilabel_result(ray_session, multilabel_root, multilabel_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report_ml") / "result"
    cfg = InferConfig(
        model_dir=str(multilabel_model_dir), data_root=str(multilabel_root), result_dir=str(out), csv="labels.csv"
    )
    run_inference(cfg)
    return out, evaluate(str(out), subset="test")


# ---------------------------------------------------------------------------------------------------------
# html.py


def test_esc_and_csp() -> None:
    assert esc(HOSTILE) == "&lt;img src=x onerror=alert(1)&gt;"
    assert esc('a"b\x1b[2J') == "a&quot;b\\x1b[2J"  # control characters shown, as on the terminal
    assert "default-src 'none'" in CSP and "unsafe-inline" not in CSP and "img-src data:;" in CSP
    assert file_url("/tmp/a b/report.html") == "file:///tmp/a%20b/report.html"
    assert file_url("s3://bucket/report.html") is None


# ---------------------------------------------------------------------------------------------------------
# thumbnails.py


def test_thumbnails_local_and_s3_with_placeholders(shapes_root: Path, s3, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(shapes_root / "images", root / "images")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 40)
    uri = s3.upload(root, "thumbs")
    paths = ["images/000000.jpg", "./images/000001.png", "images/broken.jpg", "images/nope.jpg", "../escape.jpg"]
    for data_root in (str(root), uri):
        got = thumbnails(data_root, paths)
        assert list(got) == paths
        for path in paths[:2]:
            assert got[path].error is None and got[path].mime == "image/jpeg" and got[path].data[:2] == b"\xff\xd8"
        for path in paths[2:]:
            assert got[path].error and got[path].data == placeholder()
        assert "escapes" in got["../escape.jpg"].error or "outside" in got["../escape.jpg"].error
    import io

    from PIL import Image

    small = Image.open(io.BytesIO(thumbnail(str(root), "images/000000.jpg").data))
    assert max(small.size) <= 160 and min(small.size) >= 80  # a 32-pixel image, enlarged with hard edges


# ---------------------------------------------------------------------------------------------------------
# evaluation.py


def test_report_is_self_contained_and_escaped(hostile_result) -> None:
    out, report = hostile_result
    assert report["html"] == str(out / "report.html")
    text = (out / "report.html").read_text()
    assert json.loads((out / "evaluation.json").read_text())["html"] == report["html"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and HOSTILE not in text
    assert "&lt;/script&gt;&lt;script&gt;alert(2)" in text and "alert(2)</script>" not in text
    assert text.count("<script>") == 1 and "http://" not in text and "https://" not in text
    assert re.findall(r'<img src="(?!data:image/)', text) == []
    assert len(re.findall(r"<img ", text)) <= MAX_THUMBNAILS + 2  # + the two confusion pictures
    assert report["rows"]["errors"] == 2 and "images/missing.jpg" in text and "images/truncated.png" in text


def test_subset_report_has_its_own_name(hostile_result) -> None:
    out, _ = hostile_result
    report = evaluate(str(out), subset="test", worst=2)
    assert report["html"] == str(out / "report-test.html") and (out / "report-test.html").exists()


def test_cli_prints_the_path_and_url(hostile_result) -> None:
    out, _ = hostile_result
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(out), "--worst", str(ROWS)])
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output and (out / "report.html").as_uri() in result.output
    result = CliRunner().invoke(app, ["evaluate", "--result-dir", str(out), "--json", "--worst", str(ROWS)])
    assert json.loads(result.stdout)["html"] == str(out / "report.html")


def test_multi_hot() -> None:
    import pandas as pd

    hot = multi_hot(pd.Series([[0, 2], [], [1]]), 3)
    assert hot.tolist() == [[True, False, True], [False, False, False], [False, True, False]]


@pytest.mark.timeout(180)
def test_infer_overwrite_removes_reports(hostile_result, tmp_path: Path) -> None:
    out, report = hostile_result
    copy = tmp_path / "result"
    shutil.copytree(out, copy)
    (copy / "report-test.html").write_text("old")
    (copy / "notes.txt").write_text("the user's own file")
    manifest = json.loads((copy / "manifest.json").read_text())
    cfg = InferConfig(
        model_dir=manifest["model"]["dir"],
        data_root=report["data_root"],
        result_dir=str(copy),
        csv="labels.csv",
        overwrite=True,
    )
    run_inference(cfg)
    assert (copy / "notes.txt").exists()
    assert not (copy / "report.html").exists() and not (copy / "report-test.html").exists()


# ---------------------------------------------------------------------------------------------------------
# In a real browser (conftest: Chromium through Playwright; any request off the loopback fails the test)

IMAGES_LOADED = "Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.src.slice(0, 11)])"
TABLE = "Array.from(document.querySelectorAll('#classes tbody tr')).map(r => Array.from(r.cells).map(c => c.dataset.v ?? c.textContent))"  # noqa: E501


def _open(page, path: Path, dialogs: list) -> None:
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")


def _stat(page, key: str) -> str:
    return page.locator(f'[data-key="{key}"] .value').text_content()


def test_browser_multiclass_report(hostile_result, page) -> None:
    out, report = hostile_result
    dialogs: list[str] = []
    _open(page, out / "report.html", dialogs)
    loaded = page.evaluate(IMAGES_LOADED)
    assert len(loaded) >= ROWS and all(ok and src == "data:image/" for ok, src in loaded), loaded
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert _stat(page, key) == f"{report[key]:.4f}"
    assert _stat(page, "top5") == "n/a" and _stat(page, "evaluated") == str(report["rows"]["evaluated"])
    rows = page.evaluate(TABLE)
    assert [r[0] for r in rows] == NAMES  # the hostile name is text in its cell, not an element
    for row, c in zip(rows, report["per_class"], strict=True):
        assert [float(v) for v in row[1:4]] == [c["precision"], c["recall"], c["f1"]] and row[4] == str(c["support"])
    page.locator("#classes th button", has_text="F1").click()
    f1 = [float(r[3]) for r in page.evaluate(TABLE)]
    assert f1 == sorted(f1)
    page.locator("#classes th button", has_text="F1").click()
    f1 = [float(r[3]) for r in page.evaluate(TABLE)]
    assert f1 == sorted(f1, reverse=True)
    by_name = page.locator("#classes th button", has_text="class")
    by_name.click()
    names = [r[0] for r in page.evaluate(TABLE)]
    by_name.click()
    assert [r[0] for r in page.evaluate(TABLE)] == names[::-1] and sorted(names) == sorted(NAMES)
    assert page.locator("#worst .card").count() == len(report["worst"])
    assert page.locator("#worst").get_by_text("no picture:").count() == 1  # the image deleted after inference
    assert page.locator("#failed").get_by_text("images/missing.jpg").count() == 1
    assert page.get_by_text("alert(2)").count() >= 1  # the </script> path shows as text
    assert page.evaluate("document.querySelectorAll('img[src=x], script').length") == 1  # our one script
    screenshot(page, "evaluation-report")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "evaluation-report-phone")
    assert dialogs == []


def test_browser_multilabel_report(multilabel_result, page) -> None:
    out, report = multilabel_result
    dialogs: list[str] = []
    _open(page, out / "report-test.html", dialogs)
    loaded = page.evaluate(IMAGES_LOADED)
    assert all(ok for ok, _ in loaded) and loaded
    for key in ("map", "micro_f1", "macro_f1", "sample_f1"):
        assert _stat(page, key) == f"{report[key]:.4f}"
    curves = page.locator("#curves figure").count()
    assert curves == report["map_classes"] and curves > 0
    rows = page.evaluate(TABLE)
    for row, c, t in zip(rows, report["per_class"], report["thresholds"]["values"], strict=True):
        assert row[0] == c["class"] and float(row[2]) == t
        assert (row[1] == "" and c["ap"] is None) or float(row[1]) == c["ap"]
    assert page.locator("#worst .card").count() == len(report["worst"])
    screenshot(page, "evaluation-report-multilabel")
    assert dialogs == []
