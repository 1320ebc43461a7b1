"""Shared fixtures: one local Ray for the whole session, generated datasets, model directories and odd
image files. Nothing is downloaded; everything is made here."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray's processes export their metrics every second instead of every 10 s, so test_telemetry waits less.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

IMAGE_SIZE = 32
NUM_CLASSES = 4
TINY_VIT = {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2}  # a fast model for plumbing tests


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (started on first use, stopped at the end)."""
    import ray

    # The dashboard writes the Prometheus service-discovery file that test_telemetry finds the metrics port by.
    # address="local": a fresh Ray even where a `ray start` head left its record (ray.init would join it, and
    # refuse num_cpus); the dashboard writes the Prometheus service-discovery file test_telemetry reads.
    from rayimgcls.serve import use_throughput_mode

    use_throughput_mode()  # as `rayimgcls serve` starts its Ray: the serving tests run the default settings
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small multi-class shapes dataset (200 images, 4 classes)."""
    from rayimgcls.synth import SynthConfig, make_dataset

    return make_dataset(tmp_path_factory.mktemp("shapes"), SynthConfig(num_images=200, num_classes=NUM_CLASSES, seed=1))


@pytest.fixture(scope="session")
def multilabel_root(tmp_path_factory) -> Path:
    from rayimgcls.synth import SynthConfig, make_dataset

    return make_dataset(
        tmp_path_factory.mktemp("shapes_ml"),
        SynthConfig(num_images=120, num_classes=NUM_CLASSES, multilabel=True, seed=2),
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, shapes_root) -> Path:
    """An untrained multi-class model directory (fp32) with the shapes' class names."""
    import json

    from rayimgcls.model import make_untrained_model_dir

    names = list(json.loads((shapes_root / "class_to_idx.json").read_text()))
    out = tmp_path_factory.mktemp("model") / "model"
    make_untrained_model_dir(
        out, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, class_names=names, model_kwargs=TINY_VIT
    )
    return out


@pytest.fixture(scope="session")
def multilabel_model_dir(tmp_path_factory) -> Path:
    from rayimgcls.model import make_untrained_model_dir

    out = tmp_path_factory.mktemp("model_ml") / "model"
    make_untrained_model_dir(
        out, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, multilabel=True, model_kwargs=TINY_VIT
    )
    return out


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def odd_image_bytes() -> dict[str, bytes]:
    """Files that exercise the decode path: RGBA, CMYK, EXIF-rotated, grayscale, palette, 16-bit."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgb.jpg": encode(rgb, "JPEG", quality=90),
        "rgba.png": encode(rgba, "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "exif_rotated.jpg": encode(rgb, "JPEG", quality=90, exif=exif),
        "gray.png": encode(rgb.convert("L"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "gray16.png": encode(Image.fromarray((rng.integers(0, 65536, (48, 64))).astype(np.uint16)), "PNG"),
    }


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory) -> Path:
    """A data root with odd_image_bytes() under images/ and a predictions.csv listing them."""
    root = tmp_path_factory.mktemp("odd")
    (root / "images").mkdir()
    lines = ["image_path,label,subset,metadata"]
    for name, data in odd_image_bytes().items():
        (root / "images" / name).write_bytes(data)
        lines.append(f"images/{name},0,test,{name}")
    (root / "predictions.csv").write_text("\n".join(lines) + "\n")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m rayimgcls ARGS` in a subprocess, as a user runs it (env: variables added to this one's)."""
    return subprocess.run(
        [sys.executable, "-m", "rayimgcls", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def copy_images(root: Path, shapes_root: Path, n: int) -> list[Path]:
    """The first `n` shapes images copied into root/images/; returns the copies."""
    import shutil

    (root / "images").mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, root / "images" / f.name)) for f in sorted((shapes_root / "images").iterdir())[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# S3 on loopback: moto in server mode, for the storage and cluster tests.

S3_BUCKET = "rayimgcls-test"


class S3Server:
    """A running S3 server: its endpoint, the AWS_* settings that point a process at it, and URIs in its bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join((S3_BUCKET, *parts))

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            access_key="testing",
            secret_key="testing",
            allow_bucket_creation=True,
        )

    def upload(self, local: Path, *parts: str) -> str:
        """Copy a local folder into the bucket; returns its URI."""
        import pyarrow.fs as pafs

        pafs.copy_files(str(local), "/".join((S3_BUCKET, *parts)), destination_filesystem=self.filesystem())
        return self.uri(*parts)

    def keys(self, *parts: str) -> list[str]:
        """Every object key below a prefix, relative to it, sorted."""
        import pyarrow.fs as pafs

        base = "/".join((S3_BUCKET, *parts))
        infos = self.filesystem().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 at a free port with one empty bucket, stopped at the end of the session.
    It runs in a thread of the test process, so subprocesses (Ray nodes, CLI runs) reach it too."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request buries test failures
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3Server(f"http://127.0.0.1:{port}")
        s3.filesystem().create_dir(S3_BUCKET)
        yield s3
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch) -> S3Server:
    """The S3 server's settings in this process's environment for one test (and any other AWS setting removed)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


# ---------------------------------------------------------------------------------------------------------
# A real browser: Debian's Chromium driven by Playwright (no browser download), for pages and reports.

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",  # without these Chromium keeps trying to reach hosts that are not there
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("RAYIMGCLS_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
LOCAL_URLS = ("http://127.0.0.1", "data:", "file:", "blob:", "about:")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium. Skipped where Chromium or Playwright is missing, failed instead when CI=true (CI
    installs both: .ci/run)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not chromium or sync_playwright is None:
        why = "browser tests need Debian's chromium (apt-get install chromium) and playwright (pip install playwright)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield chrome
        chrome.close()


@pytest.fixture
def page(browser):
    """A fresh page; the test fails if the page requested anything off the loopback (a CDN, a font service)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    offsite: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith(LOCAL_URLS) else offsite.append(r.url))
    yield tab
    context.close()
    assert not offsite, f"the page requested resources off the loopback: {offsite}"


def screenshot(tab, name: str) -> Path:
    """Save a screenshot under test-artifacts/ (kept after the run, to look at) and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path


def edited_model_dir(model_dir, tmp_path, edit) -> str:
    """A copy of `model_dir` whose config.json went through `edit(dict)` (written by hand, weights unchanged)."""
    from rayimgcls.card import CONFIG_FILE

    out = tmp_path / "edited"
    shutil.copytree(model_dir, out)
    card = json.loads((out / CONFIG_FILE).read_text())
    edit(card)
    (out / CONFIG_FILE).write_text(json.dumps(card))
    return str(out)
