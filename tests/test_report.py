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
from rayimgcls.config import InferConfig, TrainConfig
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


# ---------------------------------------------------------------------------------------------------------
# training.py: report.html of a real training run (a skipped row, a checkpoint Ray Train removed)


@pytest.fixture(scope="module")
def training_run(ray_session, shapes_root, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """A 3-epoch run of the tiny ViT; a thread notes what the run dir held while training went on."""
    import threading

    from rayimgcls.demo import DEMO_RECIPE
    from rayimgcls.train import run

    base = tmp_path_factory.mktemp("trainreport")
    root = base / "data"
    shutil.copytree(shapes_root, root)
    with (root / "labels.csv").open("a") as f:
        f.write(f"images/{HOSTILE}.png,1,train,\n")  # missing, and a hostile path: skipped, listed, escaped
    cfg = TrainConfig(
        **{
            **DEMO_RECIPE,
            "model": "vit_tiny_patch16_224",
            "model_kwargs": TINY_VIT,
            "batch_size": 32,
            "num_epochs": 3,
            "num_to_keep": 1,
            "logging_steps": 2,
            "torch_threads": 1,
            "skip_bad_rows": True,
            "data_root": str(root),
            "storage_path": str(base / "runs"),
            "run_name": "report",
        }
    )
    run_dir = base / "runs" / "report"
    seen: list[str] = []  # the report's status while summary.json did not exist yet
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            report = run_dir / "report.html"
            if report.exists() and not (run_dir / "summary.json").exists():
                text = report.read_text()
                seen.append(f"{text.count('<tr>') - 1} rows, {'running' if ' running ' in text else '?'}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run(cfg)
    finally:
        done.set()
        watcher.join()
    return run_dir, summary, seen


def test_training_report_is_written_during_the_run(training_run) -> None:
    run_dir, summary, seen = training_run
    assert seen and all(s.endswith("running") for s in seen), seen  # opened mid-run: the epochs so far
    text = (run_dir / "report.html").read_text()
    assert summary["completed"] and " finished " in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and HOSTILE not in text
    assert text.count("<script>") == 1 and "http://" not in text and "https://" not in text
    assert re.findall(r'<img src="(?!data:image/)', text) == []


def test_training_report_epoch_rows() -> None:
    from rayimgcls.report.training import epoch_rows

    lines = [
        {"type": "start", "epoch": 0, "step": 0, "time": 100.0},
        {"type": "step", "epoch": 1, "step": 1, "images_per_s": 10.0, "data_wait": 0.1, "time": 101.0},
        {"type": "step", "epoch": 1, "step": 2, "images_per_s": 30.0, "data_wait": 0.3, "time": 102.0},
        {"type": "epoch", "epoch": 1, "step": 2, "train_loss": 1.0, "time": 105.0},
        {"type": "resume", "epoch": 1, "step": 2, "time": 200.0},
        {"type": "epoch", "epoch": 2, "step": 4, "train_loss": 0.5, "time": 207.5},
    ]
    rows = epoch_rows(lines)
    assert [r["seconds"] for r in rows] == [5.0, 7.5]
    assert rows[0]["images_per_s"] == 20.0 and rows[0]["data_wait"] == pytest.approx(0.2)
    assert "images_per_s" not in rows[1]


EPOCHS = "Array.from(document.querySelectorAll('#epochs tbody tr')).map(r => Array.from(r.cells).map(c => c.dataset.v))"  # noqa: E501
CHECKPOINTS = "Array.from(document.querySelectorAll('#checkpoints tbody tr')).map(r => Array.from(r.cells).map(c => c.textContent))"  # noqa: E501


def test_browser_training_report(training_run, page) -> None:
    from rayimgcls.report.training import epoch_rows

    run_dir, summary, _ = training_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = epoch_rows(lines)
    dialogs: list[str] = []
    _open(page, run_dir / "report.html", dialogs)
    loaded = page.evaluate(IMAGES_LOADED)
    assert len(loaded) == 5 and all(ok and src == "data:image/" for ok, src in loaded), loaded  # the 5 curves
    assert _stat(page, "epochs") == "3"
    assert float(page.locator('[data-key="best_top1"]').get_attribute("data-value")) == summary["best"]["top1"]
    assert abs(int(_stat(page, "images_per_s")) - summary["images_per_s"]) <= 0.6  # summary.json rounds to 0.1
    shown = page.evaluate(EPOCHS)
    assert len(shown) == 3
    for row, e in zip(shown, epochs, strict=True):
        assert [float(row[0]), float(row[1]), float(row[3]), float(row[4]), float(row[5])] == [
            e["epoch"],
            e["step"],
            e["train_loss"],
            e["val_loss"],
            e["top1"],
        ]
        assert float(row[2]) == e["seconds"] > 0
    checkpoints = page.evaluate(CHECKPOINTS)
    kept = {int(p.name.rsplit("_", 1)[1]) for p in run_dir.glob("checkpoint_epoch_*")}
    assert {int(r[0]) for r in checkpoints if r[3] == "kept"} == kept and 3 in kept
    best = next(r for r in checkpoints if int(r[0]) == summary["best_epoch"])
    assert "exported as the model" in best[4] and best[2] == "1"
    assert any(r[3] == "removed" for r in checkpoints)  # num_to_keep=1 of 3 epochs
    assert page.locator("#skipped").get_by_text(HOSTILE, exact=False).count() >= 1  # the path, shown as text
    assert page.locator("#config").get_by_text("vit_tiny_patch16_224").count() == 1
    assert page.evaluate("document.querySelectorAll('img[src=x], script').length") == 1
    screenshot(page, "training-report")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert dialogs == []
