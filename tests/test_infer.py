"""Batch inference: the DESIGN §5 output contract, parity with Predictor, and refuse / overwrite / resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_images, run_cli
from typer.testing import CliRunner

from rayimgcls.card import ModelError
from rayimgcls.cli import app
from rayimgcls.config import ConfigError, InferConfig
from rayimgcls.infer import PoolPlan, glob_regex, plan_pool, run_inference, size_pool
from rayimgcls.model import Predictor
from rayimgcls.results import MANIFEST, MERGED, PipelineError, ResultDirError
from rayimgcls.runtime import ResourceError

SHARD_RE = r"predictions-\d{5}\.jsonl"


def infer(model_dir: Path, data_root: Path | None, out: Path, **kw) -> object:
    cfg = InferConfig(model_dir=str(model_dir), data_root=str(data_root or ""), result_dir=str(out), **kw)
    return run_inference(cfg)


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions-*.jsonl"))


def read_lines(out: Path) -> list[dict]:
    """All shard lines in shard order, checking each file parses line by line."""
    return [json.loads(line) for f in shard_files(out) for line in f.read_text().splitlines()]


def csv_paths(root: Path, name: str) -> list[str]:
    import csv

    with (root / name).open(newline="") as f:
        return [r["image_path"] for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory, shapes_root: Path) -> Path:
    """Good images plus every way a row can fail, duplicates included: one line each is the contract."""
    root = tmp_path_factory.mktemp("messy")
    good = copy_images(root, shapes_root, 6)
    jpeg = (root / "images" / good[0].name).read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "images" / "not_an_image.jpg").write_bytes(b"hello, world")
    rows = [f"images/{f.name}" for f in good]
    rows += [
        rows[0],
        f"./{rows[1]}",
        rows[0],  # duplicates, one spelled differently
        "images/truncated.jpg",
        "images/not_an_image.jpg",
        "images/missing.jpg",
        "../outside.jpg",
        "",
    ]
    (root / "predictions.csv").write_text("image_path,metadata\n" + "".join(f'"{r}",note\n' for r in rows))
    return root


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    ("glob", "path", "hit"),
    [
        ("*.jpg", "a.jpg", True),
        ("*.jpg", "x/a.jpg", False),
        ("**/*.jpg", "a.jpg", True),
        ("**/*.jpg", "x/y/a.jpg", True),
        ("x/?.png", "x/a.png", True),
        ("[ab].jpg", "c.jpg", False),
        ("[!ab].jpg", "c.jpg", True),
        ("a+b.jpg", "a+b.jpg", True),
    ],
)
def test_glob_regex(glob: str, path: str, hit: bool) -> None:
    assert bool(glob_regex(glob).match(path)) is hit


def test_config_refuses_contradictions() -> None:
    with pytest.raises(ConfigError, match="overwrite and resume"):
        InferConfig(model_dir="m", data_root="d", result_dir="o", overwrite=True, resume=True)
    with pytest.raises(ConfigError, match="subset='test'"):
        InferConfig(model_dir="m", result_dir="o", images="dir", subset="test")
    with pytest.raises(ConfigError, match="data_root: required"):
        InferConfig(model_dir="m", result_dir="o")


@pytest.mark.parametrize(
    ("nodes", "flags", "expected"),
    [
        ([2.0], {}, PoolPlan(actors=1, cpus=0.5, gpus=0.0, threads=2, decode_cpus=1.0)),  # a laptop
        ([16.0, 16.0], {}, PoolPlan(2, 0.5, 0.0, 16, 1.0)),  # an actor per node using its cores
        ([1.0, 1.0, 1.0], {}, PoolPlan(1, 0.5, 0.0, 1, 1.0)),  # one-CPU nodes: an actor on each would starve decoding
        ([1.0], {}, PoolPlan(1, 0.5, 0.0, 1, 0.5)),  # one core: decoding takes the half the actor leaves
        ([8.0, 8.0], {"use_gpu": True}, PoolPlan(4, 1.0, 1.0, 4, 1.0)),  # an actor per GPU
        ([8.0], {"num_actors": 3, "threads_per_actor": 1}, PoolPlan(3, 0.5, 0.0, 1, 1.0)),
    ],
)
def test_pool_sizing_always_leaves_decoding_a_cpu(nodes: list[float], flags: dict, expected: PoolPlan) -> None:
    cfg = InferConfig(model_dir="m", data_root="d", result_dir="o", **flags)
    assert size_pool(cfg, nodes, gpus=4 if cfg.use_gpu else 0, max_cpus=sum(nodes)) == expected


def test_pool_sizing_refuses_actors_that_leave_no_cpu_to_decode() -> None:
    cfg = InferConfig(model_dir="m", data_root="d", result_dir="o", num_actors=4)
    with pytest.raises(ResourceError, match="4 model actor.*none of the cluster's 2 CPUs"):
        size_pool(cfg, [2.0], gpus=0, max_cpus=2.0)


# ---------------------------------------------------------------------------------------------------------
# Output format


@pytest.mark.timeout(120)
def test_one_line_per_row_despite_broken_images_and_duplicates(ray_session, model_dir, messy_root, tmp_path) -> None:
    out = tmp_path / "out"
    summary = infer(model_dir, messy_root, out, rows_per_shard=4, top_k=3, merge=True)
    expected = csv_paths(messy_root, "predictions.csv")
    lines = read_lines(out)
    assert Counter(x["input"] for x in lines) == Counter(expected)  # the multiset, duplicates included
    assert [x["row"] for x in lines] == list(range(2, len(expected) + 2))  # CSV lines, header = 1, in order
    assert [f.name for f in shard_files(out)] == [f"predictions-{k:05d}.jsonl" for k in range(4)]
    assert not [f for f in out.iterdir() if "tmp" in f.name]
    assert "ray.data" in (out / "ray.log").read_text()  # Ray Data's own records, off the terminal
    errors = {x["input"]: x for x in lines if "error" in x}
    assert set(errors) == {
        "images/truncated.jpg",
        "images/not_an_image.jpg",
        "images/missing.jpg",
        "../outside.jpg",
        "",
    }
    assert all(list(x) == ["input", "row", "error"] and x["error"] for x in errors.values())
    assert "file not found" in errors["images/missing.jpg"]["error"]
    assert "outside the data root" in errors["../outside.jpg"]["error"]
    for x in (x for x in lines if "error" not in x):
        assert list(x) == ["input", "predictions", "top_k", "row"]
        assert abs(sum(x["predictions"]) - 1) < 1e-5
        assert [t["index"] for t in x["top_k"]] == list(np.argsort(x["predictions"])[::-1][:3])
    assert (summary.rows, summary.lines, summary.errors) == (len(expected), len(expected), 5)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["input"]["csv"] == "predictions.csv"
    assert [(s["file"], s["first_row"], s["last_row"]) for s in manifest["shards"]][-1] == (
        "predictions-00003.jsonl",
        14,
        15,
    )
    assert (out / MERGED).read_text().splitlines() == [json.dumps(x) for x in lines]


@pytest.mark.timeout(120)
def test_multilabel_lines(ray_session, multilabel_model_dir, multilabel_root, tmp_path) -> None:
    infer(multilabel_model_dir, multilabel_root, tmp_path / "out", csv="labels.csv", subset="validation")
    lines = read_lines(tmp_path / "out")
    validation = (multilabel_root / "labels.csv").read_text().count(",validation,")
    assert len(lines) == validation > 0
    for x in lines:
        p = np.array(x["predictions"])
        assert ((p >= 0) & (p <= 1)).all()
        assert x["labels"] == [str(c) for c in np.flatnonzero(p >= 0.5)]


@pytest.mark.timeout(120)
def test_parity_with_predictor_for_odd_files(ray_session, model_dir, odd_images, tmp_path) -> None:
    """RGBA, CMYK, EXIF-rotated, 16-bit ... through Ray Data, the actor pool and the written shards give
    the Python API's probabilities."""
    infer(model_dir, odd_images, tmp_path / "out", batch_size=3)
    lines = read_lines(tmp_path / "out")
    assert not [x for x in lines if "error" in x]
    predictor = Predictor.from_dir(model_dir, precision="fp32")
    expected = predictor.predict([odd_images / x["input"] for x in lines])
    for line, want in zip(lines, expected, strict=True):
        np.testing.assert_allclose(line["predictions"], want["predictions"], atol=1e-5, rtol=0)


@pytest.mark.timeout(120)
def test_images_folder_and_glob(ray_session, model_dir, odd_images, tmp_path) -> None:
    folder = odd_images / "images"
    result = CliRunner().invoke(
        app, ["infer", "--model-dir", str(model_dir), "--images", str(folder), "--result-dir", str(tmp_path / "folder")]
    )
    assert result.exit_code == 0, result.output
    assert "7 rows in: 7 predicted -> 7 lines (0 errors)" in result.output
    lines = read_lines(tmp_path / "folder")
    assert sorted(x["input"] for x in lines) == sorted(f.name for f in folder.iterdir())
    assert [x["row"] for x in lines] == list(range(1, 8))
    infer(model_dir, odd_images, tmp_path / "glob", images="images/*.png")
    assert sorted(x["input"] for x in read_lines(tmp_path / "glob")) == sorted(
        f"images/{f.name}" for f in folder.glob("*.png")
    )


# ---------------------------------------------------------------------------------------------------------
# Non-empty result dirs


@pytest.mark.timeout(120)
def test_refuse_overwrite_and_resume_checks(ray_session, model_dir, multilabel_model_dir, odd_images, tmp_path) -> None:
    out = tmp_path / "out"
    infer(model_dir, odd_images, out, rows_per_shard=3)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ResultDirError, match="not empty"):
        infer(model_dir, odd_images, out)
    with pytest.raises(ResultDirError, match="rows_per_shard: 3 -> 2"):
        infer(model_dir, odd_images, out, rows_per_shard=2, resume=True)
    with pytest.raises(ResultDirError, match="model.multilabel: false -> true"):
        infer(multilabel_model_dir, odd_images, out, rows_per_shard=3, resume=True)
    (out / "predictions-00007.jsonl.tmp").write_text("partial")
    summary = infer(model_dir, odd_images, out, rows_per_shard=4, overwrite=True)
    assert summary.shards_written == 2
    assert sorted(f.name for f in out.iterdir()) == [
        MANIFEST,
        "notes.txt",
        "predictions-00000.jsonl",
        "predictions-00001.jsonl",
        "ray.log",
    ]
    nothing_left = infer(model_dir, odd_images, out, rows_per_shard=4, resume=True)
    assert (nothing_left.computed, nothing_left.shards_kept) == (0, 2)


@pytest.mark.timeout(120)
def test_model_that_fails_to_load_stops_with_a_message(ray_session, model_dir, odd_images, tmp_path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PipelineError, match="does not match the version .* --resume"):
        infer(broken, odd_images, tmp_path / "out")
    (broken / "model.safetensors").unlink()  # caught before any Ray work starts
    with pytest.raises(ModelError, match="model.safetensors not found"):
        infer(broken, odd_images, tmp_path / "out2")


def test_cli_refuses_non_empty_dir_without_traceback(model_dir, odd_images, tmp_path) -> None:
    (tmp_path / "x.txt").write_text("x")
    result = CliRunner().invoke(
        app, ["infer", "--model-dir", str(model_dir), "--data-root", str(odd_images), "--result-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--resume" in result.output and "Traceback" not in result.output


def test_a_dashboard_address_is_refused_before_the_result_dir_is_touched(model_dir, odd_images, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["infer", "--model-dir", str(model_dir), "--data-root", str(odd_images), "--result-dir", str(out)]
    result = CliRunner().invoke(app, [*args, "--address", "http://127.0.0.1:8265"])
    assert result.exit_code == 2 and "dashboard address" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.timeout(240)
def test_killed_run_resumes_keeping_complete_shards(ray_session, model_dir, shapes_root, tmp_path) -> None:
    """Kill `rayimgcls infer` (the process we started) once its first shard lands; --resume keeps the
    complete shards byte for byte and computes only the rest."""
    root, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(shapes_root / "images", root / "images")
    images = sorted(f"images/{f.name}" for f in (root / "images").iterdir())
    paths = [images[i % len(images)] for i in range(1500)]
    (root / "big.csv").write_text("image_path\n" + "\n".join(paths) + "\n")
    args = [
        "--model-dir",
        str(model_dir),
        "--data-root",
        str(root),
        "--csv",
        "big.csv",
        "--result-dir",
        str(out),
        "--rows-per-shard",
        "50",
        "--batch-size",
        "16",
    ]
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayimgcls", "infer", *args, "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not shard_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kept = {f.name: (f.stat().st_ino, f.read_bytes()) for f in shard_files(out)}
    assert 0 < len(kept) < 30
    summary = infer(model_dir, root, out, csv="big.csv", rows_per_shard=50, batch_size=16, resume=True)
    assert summary.shards_kept == len(kept) and summary.shards_written == 30 - len(kept)
    assert summary.computed == 1500 - 50 * len(kept)
    assert all(
        (out / name).stat().st_ino == ino and (out / name).read_bytes() == data for name, (ino, data) in kept.items()
    )
    lines = read_lines(out)
    assert Counter(x["input"] for x in lines) == Counter(paths)
    assert [x["row"] for x in lines] == list(range(2, 1502))
    assert not [f for f in out.iterdir() if "tmp" in f.name]
    assert json.loads((out / MANIFEST).read_text())["complete"]


@pytest.mark.parametrize(
    ("gpus", "flags", "expected"),
    [
        (4.0, {}, PoolPlan(4, 1.0, 1.0, 4, 1.0)),  # a whole GPU each
        (4.0, {"gpus_per_actor": 0.5}, PoolPlan(8, 1.0, 0.5, 2, 1.0)),  # two actors share each GPU
        (0.3, {"gpus_per_actor": 0.1}, PoolPlan(3, 1.0, 0.1, 4, 1.0)),  # 0.3 / 0.1 is 2.999... in floats
        (3.0, {"gpus_per_actor": 0.1}, PoolPlan(30, 0.25, 0.1, 1, 1.0)),  # many small actors: one thread each
        (0.5, {"gpus_per_actor": 0.25}, PoolPlan(2, 1.0, 0.25, 8, 1.0)),  # a fractional GPU resource
    ],
)
def test_gpu_pool_plan_for_whole_and_shared_gpus(gpus: float, flags: dict, expected: PoolPlan) -> None:
    if expected.cpus != 1.0:
        flags = {**flags, "cpus_per_actor": expected.cpus}
    cfg = InferConfig(model_dir="m", data_root="d", result_dir="o", use_gpu=True, **flags)
    assert size_pool(cfg, [8.0, 8.0], gpus=gpus, max_cpus=16.0) == expected


def test_gpu_share_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"gpus_per_actor=1.5: allowed 0 < x <= 1"):
        InferConfig(model_dir="m", data_root="d", result_dir="o", use_gpu=True, gpus_per_actor=1.5)
    with pytest.raises(ConfigError, match=r"gpus_per_actor=0.5: only with use_gpu"):
        InferConfig(model_dir="m", data_root="d", result_dir="o", gpus_per_actor=0.5)


def test_a_gpu_pool_the_cluster_cannot_hold_is_refused(ray_session) -> None:
    cfg = InferConfig(model_dir="m", data_root="d", result_dir="o", use_gpu=True, gpus_per_actor=0.5)
    with pytest.raises(ResourceError, match=r"inference: 0.5 GPU\(s\) requested, the cluster has 0"):
        plan_pool(cfg)


# ---------------------------------------------------------------------------------------------------------
# One bad row never kills a job; outputs and resumes are checked row by row (issue 10, items 2, 5, 7)


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, shapes_root: Path) -> Path:
    """Two good images, a 1 x 40,000,000 PNG (written by PIL) and image paths with a NUL and an ANSI escape."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hostile")
    good = copy_images(root, shapes_root, 2)
    Image.new("L", (1, 40_000_000), 128).save(root / "images" / "thin.png")
    rows = [
        f"images/{good[0].name}",
        "images/thin.png",
        "images/a\x00b.jpg",
        "images/\x1b[2Jc.jpg",
        f"images/{good[1].name}",
    ]
    text = "image_path,label,subset\n" + "".join(f"{r},0,test\n" for r in rows)
    (root / "labels.csv").write_bytes(text.encode())
    (root / "predictions.csv").write_bytes(text.encode())
    return root


@pytest.mark.timeout(240)
def test_validate_and_infer_agree_on_hostile_rows(ray_session, model_dir, hostile_root, tmp_path) -> None:
    """The thin PNG passes `validate` (decode + the eval transform) and predicts in `infer`; the paths with
    control characters are named bad rows in validate and error lines in infer, and the job goes on."""
    checked = run_cli("validate", str(hostile_root))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr[-2000:]
    assert "labels.csv:4: images/a\\x00b.jpg: the path contains the control character '\\x00'" in checked.stdout
    assert "labels.csv:5: images/\\x1b[2Jc.jpg:" in checked.stdout and "\x1b" not in checked.stdout
    assert "thin.png" not in checked.stdout and checked.stdout.count("[bad_path]") == 4  # labels + predictions
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    done = run_cli(
        *["infer", "--model-dir", str(model_dir), "--data-root", str(hostile_root)],
        "--result-dir",
        str(out),
        "--address",
        address,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {x["row"]: x for x in read_lines(out)}
    assert sorted(lines) == [2, 3, 4, 5, 6]
    assert "predictions" in lines[3] and lines[3]["input"] == "images/thin.png"
    assert "control character" in lines[4]["error"] and lines[4]["input"] == "images/a\x00b.jpg"
    assert "control character" in lines[5]["error"]
    assert "predictions" in lines[2] and "predictions" in lines[6]
    assert "\x1b" not in done.stdout  # the summary's error lines are JSON: escaped


@pytest.mark.timeout(180)
def test_resume_reverifies_kept_shards_and_compares_preprocessing(ray_session, model_dir, odd_images, tmp_path) -> None:
    out = tmp_path / "out"
    infer(model_dir, odd_images, out, rows_per_shard=3)
    first = (out / "predictions-00000.jsonl").read_text().splitlines()
    second = (out / "predictions-00001.jsonl").read_text()
    # by hand: shard 0 with its first row twice and its second missing (the line count still matches),
    # shard 1 cut short mid-line
    (out / "predictions-00000.jsonl").write_text("\n".join([first[0], first[0], first[2]]) + "\n")
    (out / "predictions-00001.jsonl").write_text(second[: len(second) // 2])
    summary = infer(model_dir, odd_images, out, rows_per_shard=3, resume=True)
    assert (summary.shards_kept, summary.shards_written) == (1, 2)
    assert [x["row"] for x in read_lines(out)] == list(range(2, 9))
    assert (out / "predictions-00000.jsonl").read_text().splitlines() == first
    # the same weights (same version) with another preprocessing: every probability would differ
    edited = tmp_path / "model"
    shutil.copytree(model_dir, edited)
    card = json.loads((edited / "config.json").read_text())
    card["preprocess"]["crop_pct"] = 1.0
    (edited / "config.json").write_text(json.dumps(card))
    with pytest.raises(ResultDirError, match=r"model.preprocess.crop_pct: 0.9 -> 1.0\n"):
        infer(edited, odd_images, out, rows_per_shard=3, resume=True)
    with pytest.raises(ResultDirError, match=r"model.preprocess.max_pixels: 50000000 -> 1000\n"):
        infer(model_dir, odd_images, out, rows_per_shard=3, resume=True, max_pixels=1000)


@pytest.mark.timeout(240)
def test_ctrl_c_stops_infer_within_seconds(ray_session, model_dir, shapes_root, tmp_path) -> None:
    """SIGINT (Ctrl-C) to `rayimgcls infer` mid-run: a message and exit 130 within seconds, complete shards
    kept (the interpreter's own exit used to wait 10-20 s on Ray Data's threads)."""
    root, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(shapes_root / "images", root / "images")
    images = sorted(f"images/{f.name}" for f in (root / "images").iterdir())
    (root / "big.csv").write_text("image_path\n" + "\n".join(images[i % len(images)] for i in range(1500)) + "\n")
    args = ["--model-dir", str(model_dir), "--data-root", str(root), "--csv", "big.csv", "--result-dir", str(out)]
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayimgcls", "infer", *args, "--rows-per-shard", "50", "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 150
        while not shard_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start < 10, f"{time.monotonic() - start:.1f} s"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and "error: interrupted" in err and "Traceback" not in err, err[-2000:]
    assert shard_files(out)  # complete shards stay for --resume
