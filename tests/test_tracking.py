"""train/tracking.py against a real `mlflow server` on loopback (sqlite backend, artifacts in a temp dir), read
back through `mlflow.MlflowClient`; the refusals that come before Ray starts, through the real CLI.
(TensorBoard's event files are checked in test_train.py, on the resumed run there.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port
from test_train import tiny_config

from rayimgcls.card import read_card
from rayimgcls.config import ConfigError, TrainConfig
from rayimgcls.synth import SynthConfig, make_dataset
from rayimgcls.train import run

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow", reason='MLflow is the optional extra: pip install -e ".[mlflow,test]"')


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 at a free port; stopped (its whole process group) at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # it listens before it answers
                pass
            assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group of the process we started: the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), SynthConfig(num_images=96, seed=4))


@pytest.mark.timeout(600)
def test_a_run_and_its_resume_in_mlflow(ray_session, mlflow_server, data_root, tmp_path):
    cfg = tiny_config(
        data_root,
        tmp_path,
        "tracked",
        num_epochs=1,
        mlflow_tracking_uri=mlflow_server,
        mlflow_experiment="shapes",
        register_model="shapes-vit",
    )
    first = run(cfg)
    client = mlflow.MlflowClient(mlflow_server)
    run_id = json.loads((tmp_path / "tracked" / "mlflow.json").read_text())["run_id"]
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tracked"
    assert client.get_experiment(logged.info.experiment_id).name == "shapes"
    params = logged.data.params
    assert params["learning_rate"] == str(cfg.learning_rate) and params["model"] == cfg.model
    assert json.loads(params["model_kwargs"]) == cfg.model_kwargs
    assert "num_epochs" not in params and logged.data.tags["num_epochs"] == "1"  # may change on resume: a tag
    version = read_card(first["model_dir"]).version
    assert logged.data.tags["rayimgcls.model_version"] == version

    def history(tag: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, tag)]

    def jsonl(kind: str, key: str) -> list[tuple[int, float]]:
        lines = [json.loads(x) for x in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x[key]) for x in lines if x["type"] == kind]

    assert history("train/loss") == jsonl("step", "loss") and len(history("train/loss")) == first["steps"]
    assert history("val/top1") == jsonl("epoch", "top1")
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "curves.png", "summary.json", "model"}
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/config.json", "model/model.safetensors"}
    (registered,) = client.search_model_versions("name='shapes-vit'")
    assert registered.run_id == run_id and registered.tags["rayimgcls.model_version"] == version

    second = run(TrainConfig(**{**cfg.__dict__, "num_epochs": 2}))  # trains on: the same MLflow run continues
    assert json.loads((tmp_path / "tracked" / "mlflow.json").read_text())["run_id"] == run_id
    assert history("train/loss") == jsonl("step", "loss") and len(history("train/loss")) == second["steps"]
    assert [s for s, _ in history("val/top1")] == [first["steps"], second["steps"]]
    assert client.get_run(run_id).data.tags["num_epochs"] == "2"
    assert sorted(int(v.version) for v in client.search_model_versions("name='shapes-vit'")) == [1, 2]
    assert len(client.search_runs([logged.info.experiment_id])) == 1


def train_cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}from rayimgcls.train.__main__ import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_an_unreachable_tracking_server_is_refused_in_seconds(data_root, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    out = train_cli("--data-root", str(data_root), "--storage-path", str(tmp_path), "--mlflow-tracking-uri", uri)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"mlflow_tracking_uri='{uri}': not usable from this machine: GET {uri}/health failed" in out.stderr
    assert time.time() - started < 60 and not list(tmp_path.iterdir())  # before Ray, before the run dir


def test_a_missing_mlflow_extra_is_a_clear_message(data_root, tmp_path):
    blocked = "import sys; sys.modules['mlflow'] = None; "  # as if the extra were not installed
    args = ("--data-root", str(data_root), "--storage-path", str(tmp_path), "--mlflow-tracking-uri", "http://x:1")
    out = train_cli(*args, prelude=blocked)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert 'MLflow is not installed in this Python; install the extra: pip install "rayimgcls[mlflow]"' in out.stderr


def test_register_model_needs_a_tracking_uri(data_root):
    with pytest.raises(ConfigError, match="register_model='m': needs mlflow_tracking_uri"):
        TrainConfig(data_root=str(data_root), register_model="m")


def test_tensorboard_on_s3_is_uploaded_each_epoch_and_rewritten_on_resume(s3, tmp_path):
    """The object-storage path of TensorBoardLog (written locally, uploaded at flush) with a real S3 server: a
    resume that replays the kept lines leaves one event file with each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rayimgcls.rundir import RunDir
    from rayimgcls.train.tracking import TensorBoardLog

    run = RunDir(s3.uri("tb", "run"))
    lines = [{"type": "step", "epoch": 1, "step": s, "loss": 1.0 / s, "time": 1000.0 + s} for s in range(1, 7)]
    first = TensorBoardLog(run)
    for line in lines:
        first.log(line)
    first.flush()  # an epoch end; then the attempt dies without close()
    assert len(s3.keys("tb", "run", "tensorboard")) == 1
    second = TensorBoardLog(run)  # the resumed attempt: kept steps 1..3, then trains 4..6 again
    for line in lines:
        second.log(line)
    second.close()
    (name,) = s3.keys("tb", "run", "tensorboard")
    (tmp_path / name).write_bytes(s3.filesystem().open_input_file(f"{run.path[5:]}/tensorboard/{name}").read())
    events = EventAccumulator(str(tmp_path), purge_orphaned_data=False)
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
