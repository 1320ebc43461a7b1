"""The typer CLI as a user runs it: make-dataset, validate (exit codes, --json, the Ray path), from-folders,
and clean errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

from conftest import free_port, run_cli
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


# ---------------------------------------------------------------------------------------------------------
# Every error a user can cause is a message and a non-zero exit; our own bugs keep their traceback (issue 10, 4)


def infer_args(model_dir, data_root, out) -> list[str]:
    return ["infer", "--model-dir", str(model_dir), "--data-root", str(data_root), "--result-dir", str(out)]


def assert_user_error(out: subprocess.CompletedProcess, *expected: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    for part in expected:
        assert part in text, text[-3000:]


def test_permission_denied_and_a_directory_for_a_file(tmp_path, model_dir, odd_images):
    # /sys refuses new entries even to root: a real permission error, whoever runs the tests
    assert_user_error(run_cli(*infer_args(model_dir, odd_images, "/sys/rayimgcls-test/out")), "/sys/rayimgcls-test")
    (tmp_path / "labels.csv").mkdir()
    assert_user_error(run_cli("validate", str(tmp_path)), "labels.csv: is a directory, not a file")


def test_s3_errors_are_messages(s3_server, model_dir, odd_images):
    out = run_cli(*infer_args(model_dir, odd_images, "s3://no-such-bucket/out"), env=s3_server.env)
    assert_user_error(out, "s3://no-such-bucket/out", "not found")
    closed = {**s3_server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens on the discard port
    assert_user_error(run_cli("validate", s3_server.uri("data"), env=closed), "s3://", "connect")


def test_s3_access_denied_is_a_message(tmp_path, model_dir, odd_images):
    """A bucket the credentials may not use: moto enforcing IAM (its first requests, the set-up, pass unchecked),
    and a user whose only permission is sts:GetCallerIdentity."""
    with denied_s3() as env:
        assert_user_error(
            run_cli("validate", "s3://denied-bucket/data", env=env), "s3://denied-bucket/data", "access denied"
        )
        out = run_cli(*infer_args(model_dir, odd_images, "s3://denied-bucket/out"), env=env)
        assert_user_error(out, "s3://denied-bucket/out", "access denied")


@contextlib.contextmanager
def denied_s3() -> Iterator[dict[str, str]]:
    import boto3
    import requests

    port = free_port()
    setup_requests = 5  # the readiness probe, the bucket, the user, its policy, its key
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        admin = {"endpoint_url": url, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", **admin).create_bucket(Bucket="denied-bucket")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="nobody")
        only_whoami = {"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [only_whoami]})
        iam.put_user_policy(UserName="nobody", PolicyName="nothing", PolicyDocument=policy)
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_broken_model_directory_is_a_message(tmp_path, model_dir, odd_images):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    card = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps([card]))
    assert_user_error(run_cli(*infer_args(broken, odd_images, tmp_path / "o")), "config.json: expected a JSON object")
    card = {**card, "num_classes": 5, "class_names": [*card["class_names"], "extra"]}
    (broken / "config.json").write_text(json.dumps(card))  # kwargs still say 4: config.json contradicts itself
    out = run_cli(*infer_args(broken, odd_images, tmp_path / "o"))
    assert_user_error(out, "model.kwargs.num_classes=4 but num_classes=5")
    card["model"]["kwargs"]["num_classes"] = 5
    (broken / "config.json").write_text(json.dumps(card))  # consistent, but the weights have a 4-class head
    out = run_cli(*infer_args(broken, odd_images, tmp_path / "o"))
    assert_user_error(
        out, "model.safetensors does not fit config.json", "head.weight is [4, 48], the model needs [5, 48]"
    )
    assert not (tmp_path / "o").exists()  # refused before anything was written or started


def test_a_bug_keeps_its_traceback_and_debug_shows_one_for_user_errors(tmp_path):
    import pytest

    from rayimgcls.cli import user_errors

    with pytest.raises(FileNotFoundError), user_errors():  # not a path the user gave: a bug of ours
        open(tmp_path / "our-own-file-that-a-bug-lost")  # noqa: SIM115
    result = runner.invoke(app, ["--debug", "validate", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "Traceback" in result.output and "labels.csv: not found" in result.output


def test_training_refuses_a_label_past_1000_classes(tmp_path):
    """A label 1500 used to train a 1501-class model; now it is a bad row named by its line, before Ray starts."""
    runner.invoke(app, ["make-dataset", str(tmp_path / "d"), "--num-images", "12"])
    (tmp_path / "d" / "class_to_idx.json").unlink()
    with (tmp_path / "d" / "labels.csv").open("a") as f:
        f.write("images/000001.jpg,1500,train,\n")
    args = ["train", "--data-root", str(tmp_path / "d"), "--storage-path", str(tmp_path / "runs"), "--run-name", "t"]
    assert_user_error(
        run_cli(*args), "labels.csv:14: images/000001.jpg: label 1500 outside [0, 3] (at most 1000 classes)"
    )
