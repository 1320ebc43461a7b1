"""console.py: what `rayimgcls demo` prints, through a pipe and on a pseudo-terminal (util-linux `script`).

Each run is a real demo (its own local Ray, Ray Train, Ray Data inference, evaluation), small.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rayimgcls import console

RAY_INTERNALS = re.compile(
    r"core_worker\.cc|rpc_client\.h|logging\.cc|raylet|TrainingReport\(|Execution plan|streaming_executor|"
    r"\(pid=|\(RayTrainWorker|\(MapWorker|\(TrainController|INFO worker\.py|Started a local Ray"
)
DEMO = ["--num-images", "120", "--num-epochs", "2"]


def _env(tmp_path: Path) -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.VERBOSE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    return env


def _check_summary(out: str, tmp_path: Path) -> None:
    assert not RAY_INTERNALS.search(out), RAY_INTERNALS.search(out)
    for stage in ("1/4 dataset", "2/4 training", "3/4 batch inference", "4/4 evaluation", "demo done in"):
        assert stage in out
    assert re.search(r"epoch +1/2 +train_loss \d\.\d{4} +val_loss", out) and re.search(r"epoch +2/2 +train_loss", out)
    training = re.search(r"training: +(\S+report\.html)", out)
    evaluation = re.search(r"evaluation: +(\S+report\.html)", out)
    assert training and evaluation, out
    assert Path(training.group(1)).exists() and Path(evaluation.group(1)).exists()
    assert (Path(training.group(1)).parent / console.RAY_LOG_FILE).stat().st_size > 0  # Ray's logs, kept


@pytest.mark.timeout(600)
def test_demo_through_a_pipe_is_short_plain_and_quiet(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rayimgcls", "demo", "--out-dir", str(tmp_path / "demo"), *DEMO]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=580, env=_env(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    _check_summary(out, tmp_path)
    assert "\x1b" not in out and "\r" not in out  # no control characters in a log
    assert len(out.splitlines()) < 60, out
    stamped = [x for x in done.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d ", x)]
    assert any("epoch 1/2 step" in x for x in stamped) or len(stamped) >= 2, out  # progress lines
    assert any(re.search(r"inference \d+/16 rows", x) for x in stamped), out


@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script")
def test_demo_on_a_terminal_shows_live_progress(tmp_path: Path) -> None:
    demo = " ".join([sys.executable, "-m", "rayimgcls", "demo", "--out-dir", str(tmp_path / "demo"), *DEMO])
    log = tmp_path / "typescript"
    env = {**_env(tmp_path), "TERM": "xterm-256color", "COLUMNS": "160"}
    done = subprocess.run(
        ["script", "-qec", demo, str(log)],
        capture_output=True,
        text=True,
        timeout=580,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    raw = log.read_text(errors="replace")
    assert done.returncode == 0, raw
    assert "\x1b[" in raw  # the live display redraws
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r", "\n")
    _check_summary(text, tmp_path)
    assert re.search(r"epoch [12]/2 step \d/\d", text) and "img/s" in text and "ETA" in text


def test_plain_lines_come_per_tenth_of_the_run_and_per_epoch(capsys, monkeypatch) -> None:
    monkeypatch.setattr(console, "is_terminal", lambda: False)
    with console.TrainDisplay(total_epochs=2, steps_per_epoch=50) as display:
        for epoch in (1, 2):
            for step in range(1, 51):
                record = {
                    "epoch": epoch,
                    "epochs": 2,
                    "step": step,
                    "steps": 50,
                    "global_step": 50 * (epoch - 1) + step,
                }
                display.handle("step", {**record, "loss": 0.5, "lr": 1e-3, "images_per_s": 100.0, "data_wait": 0.02})
            display.handle("epoch", {"epoch": epoch, "step": 50 * epoch, "train_loss": 0.5, "val_loss": 0.25})
        display.handle("note", {"message": "bell \x07 here"})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 + 2 + 1  # a line per tenth of the run (steps 1, 10, ..., 40, 51, 60, ...), 2 rows, the note
    assert all(re.match(r"\d\d:\d\d:\d\d ", x) for x in lines)
    assert "epoch 1/2 step 10/50 (10% of the run)" in lines[1] and "data-wait 2%" in lines[1]
    assert re.search(r"epoch +1/2 +train_loss 0\.5000 +val_loss 0\.2500", "\n".join(lines))
    assert lines[-1].endswith("bell \\x07 here")  # control characters escaped


def test_verbose_switch(monkeypatch) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose()
    console.set_verbose(True)
    assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1"
    assert console.ray_init_options() == {}  # --verbose: Ray as it is
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose()


def test_ray_log_takes_ray_records_only_while_its_block_runs(tmp_path: Path) -> None:
    logger = logging.getLogger("ray.data")
    with console.ray_log(str(tmp_path / "first")) as path:
        logger.warning("during the first run")
    logger.warning("after it")
    with console.ray_log(str(tmp_path / "second")):
        logger.warning("during the second run")
    assert path is not None
    first = Path(path).read_text()
    assert "during the first run" in first and "after it" not in first and "second" not in first
    with console.ray_log("s3://bucket/results") as nowhere:
        assert nowhere is None  # a URI: no local file to write
