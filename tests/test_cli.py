"""The typer CLI as a user runs it: make-dataset, validate (exit codes, --json, the Ray path), from-folders,
and clean errors instead of tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from rayimgcls.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "rayimgcls", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("make-dataset", "from-folders", "validate", "train"):
        assert command in out.stdout


def test_make_dataset_then_validate(tmp_path):
    result = runner.invoke(app, ["make-dataset", str(tmp_path / "d"), "--num-images", "24", "--seed", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "d")])
    assert result.exit_code == 0 and "OK: no problems found" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "d"), "--json"])
    report = json.loads(result.output)
    assert report["ok"] and report["rows"]["labels.csv"] == 24 and report["num_classes"] == 4


def test_validate_exits_1_and_lists_problems(tmp_path):
    runner.invoke(app, ["make-dataset", str(tmp_path), "--num-images", "12"])
    with (tmp_path / "labels.csv").open("a") as f:
        f.write("images/none.jpg,0,train,\nimages/000001.jpg,7,test,\n")
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "labels.csv:14: images/none.jpg:" in result.output and "[missing_file]" in result.output
    assert "labels.csv:15: images/000001.jpg: label 7 outside [0, 3]" in result.output


def test_validate_on_ray_above_the_threshold(ray_session, tmp_path):
    runner.invoke(app, ["make-dataset", str(tmp_path), "--num-images", "12"])
    broken = (tmp_path / "labels.csv").read_text().splitlines()[3].split(",")[0]
    (tmp_path / broken).write_bytes(b"garbage")
    result = runner.invoke(app, ["validate", str(tmp_path), "--ray-above", "0"])
    assert result.exit_code == 1 and "images checked on Ray" in result.output
    assert f"labels.csv:4: {broken}:" in result.output


def test_user_errors_are_messages_not_tracebacks(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "labels.csv: not found" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["make-dataset", str(tmp_path), "--num-classes", "99"])
    assert result.exit_code == 2 and "num_classes=99" in result.output
    result = runner.invoke(app, ["from-folders", str(tmp_path), str(tmp_path / "o"), "--train", "0.9"])
    assert result.exit_code == 2 and "sum to 1" in result.output
