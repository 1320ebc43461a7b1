"""cluster/ and jobs/: every config loads and says only what the code accepts, and rayimgcls runs on a real
multi-node Ray cluster with nothing but S3 for storage.

The cluster tests start their own Ray (`ray start` head and workers, each a node with its own resources) in
subprocesses, apart from the session's in-process Ray, with their own ports, temp dir and HOME, and token
authentication on. The nodes get no AWS settings: the S3 endpoint and keys reach the workers only through the
runtime env, as on a real cluster whose client holds them.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import click
import pytest
import requests
import typer
import yaml
from conftest import TINY_VIT, S3Server, free_port
from packaging.requirements import Requirement
from test_telemetry import Sample, discovery_targets, total, wait_for

from rayimgcls.cli import app
from rayimgcls.config import InferConfig, ServeConfig, TrainConfig, check_keys, load_config
from rayimgcls.serve.application import THROUGHPUT_ENV

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("jobs/**/*.yaml")])
IMAGE_ROOT = "/home/ray/rayimgcls"  # where cluster/Dockerfile puts the checkout
RAY_VERSION = "2.60.0"
RETIRED_SERVE_KEYS = {"max_concurrent_queries", "target_num_ongoing_requests_per_replica"}
COMMAND_KEYS = {
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "entrypoint",
}
EMBEDDED_YAML_KEYS = {"serveConfigV2", "runtimeEnvYAML"}


def load(path: Path) -> dict:
    (doc,) = yaml.safe_load_all(path.read_text())
    assert isinstance(doc, dict), f"{path}: not a mapping"
    return doc


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a YAML tree, YAML embedded in strings (serveConfigV2) included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(yaml.safe_load(value) if key in EMBEDDED_YAML_KEYS else value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


# ---------------------------------------------------------------------------------------------------------
# Command lines: tokenised as a shell would, parsed by the click command they name.


def simple_commands(line: str) -> list[list[str]]:
    """A shell line split into simple commands at ; && || | and parentheses, leading VAR=value dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|()"):
            commands.append([])
        elif commands[-1] or "=" not in token:
            commands[-1].append(token)
    return [c for c in commands if c]


def click_command(argv: list[str]) -> tuple[Any, list[str]] | None:
    """The click command a command line runs and its arguments; None for programs that are not ours or Ray's."""
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    rayimgcls = typer.main.get_command(app)
    if argv[:3] == ["python", "-m", "rayimgcls.train"]:
        return rayimgcls.commands["train"], argv[3:]  # type: ignore[attr-defined]  # what train.main runs
    if argv[:3] == ["python", "-m", "rayimgcls"]:
        return rayimgcls, argv[3:]
    programs = {"rayimgcls": rayimgcls, "ray": ray_cli, "serve": serve_cli}
    return (programs[argv[0]], argv[1:]) if argv[0] in programs else None


def parse(command: Any, args: list[str]) -> Any:
    """Resolve subcommands and parse every flag, returning the command's context: an unknown flag or a bad value
    raises. (Typer carries its own copy of click, so commands are told apart by what they do, not their class.)"""
    name, ctx = command.name or "cli", None
    while hasattr(command, "get_command"):  # a group
        ctx = command.context_class(command, info_name=name, parent=ctx)
        name, *args = args
        sub = command.get_command(ctx, name)
        assert sub is not None, f"no command {name!r} in {command.name}"
        command = sub
    return command.make_context(name, list(args), parent=ctx)


def command_lines(doc: dict) -> list[str]:
    lines = []
    for key, value in walk(doc):
        if key in COMMAND_KEYS:
            lines += value if isinstance(value, list) else [value]
    return lines


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_loads_with_current_keys_and_commands_that_parse(path: Path) -> None:
    doc = load(path)
    keys = {k for k, _ in walk(doc)}
    assert not keys & RETIRED_SERVE_KEYS, f"{path}: retired Serve keys {keys & RETIRED_SERVE_KEYS}"
    parsed = [
        parse(*found) for line in command_lines(doc) for argv in simple_commands(line) if (found := click_command(argv))
    ]
    assert bool(parsed) == bool(command_lines(doc)), f"{path}: command lines, but none of ours or Ray's"


def test_parse_refuses_unknown_flags() -> None:
    """The guard above has teeth: a renamed flag or a misspelt command fails."""
    with pytest.raises(Exception, match="No such option: --num-epoch"):
        parse(*click_command(["python", "-m", "rayimgcls.train", "--num-epoch", "3"]))
    with pytest.raises(Exception, match="valid integer"):
        parse(*click_command(["python", "-m", "rayimgcls", "train", "--num-epochs", "three"]))
    with pytest.raises(click.NoSuchOption):
        parse(*click_command(["ray", "start", "--head", "--dashbord-host=0.0.0.0"]))
    with pytest.raises(AssertionError, match="no command 'infr'"):
        parse(*click_command(["python", "-m", "rayimgcls", "infr", "--model-dir", "m"]))
    assert simple_commands("ulimit -n 1; A=b ray start --head && echo $(cat f)") == [
        ["ulimit", "-n", "1"],
        ["ray", "start", "--head"],
        ["echo", "$"],
        ["cat", "f"],
    ]


# ---------------------------------------------------------------------------------------------------------
# What each file must say


def test_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(REPO / "cluster/aws.yaml")
    validate_config(prepare_config(raw))  # Ray's own schema: unknown keys and wrong types fail
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    gpu = [t for n, t in types.items() if n != raw["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    cpu = [t for n, t in types.items() if n != raw["head_node_type"] and not t["resources"].get("GPU")]
    assert head["resources"].get("CPU") == 0 and gpu and cpu
    assert all(0 <= t["min_workers"] < t["max_workers"] <= raw["max_workers"] for t in gpu + cpu)
    images = [raw["docker"]["head_image"], raw["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in types.values() if "docker" in t]
    assert all(image.startswith(f"rayproject/ray:{RAY_VERSION}-") for image in images), images
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    assert {f"--env {k}={v}" for k, v in THROUGHPUT_ENV.items()} <= set(raw["docker"]["run_options"])
    installs = [
        argv[2:] for line in raw["setup_commands"] for argv in simple_commands(line) if argv[:2] == ["pip", "install"]
    ]
    ray_pins = [Requirement(a) for args in installs for a in args if a.startswith("ray[")]
    assert ray_pins and all(str(r.specifier) == f"=={RAY_VERSION}" for r in ray_pins)
    checkout = next(remote for remote, local in raw["file_mounts"].items() if local == ".")
    assert any(checkout in args for args in installs), "setup_commands must install the mounted checkout"
    starts = [argv for line in raw["head_start_ray_commands"] for argv in simple_commands(line)]
    assert any(argv[:3] == ["ray", "start", "--head"] for argv in starts)


def test_dockerfile_pins_ray() -> None:
    lines = (REPO / "cluster/Dockerfile").read_text().splitlines()
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG BASE="))
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-")
    assert f'"ray[default,train,data,serve]=={RAY_VERSION}"' in next(x for x in lines if x.startswith("RUN pip"))


def kuberay_cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in cluster/kuberay, standalone or inside a RayJob / RayService."""
    specs = {}
    for path in sorted((REPO / "cluster/kuberay").glob("*.yaml")):
        doc = load(path)
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"], path
        spec = doc["spec"]
        specs[path.name] = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }[doc["kind"]]
    return specs


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_clusters_pin_ray_turn_on_tokens_and_autoscale() -> None:
    specs = kuberay_cluster_specs()
    assert set(specs) == {"raycluster.yaml", "rayjob-train.yaml", "rayservice.yaml"}
    for name, spec in specs.items():
        assert spec["rayVersion"] == RAY_VERSION and spec["authOptions"]["mode"] == "token", name
        assert spec["enableInTreeAutoscaling"] is True, name
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (name, group["groupName"])
    cluster = specs["raycluster.yaml"]
    gpu_requests = [c["resources"]["requests"].get("nvidia.com/gpu") for c in containers(cluster)]
    assert "1" in gpu_requests and None in gpu_requests  # a GPU worker group and CPU-only groups


def test_rayjob_trains_with_a_fixed_run_name() -> None:
    job = load(REPO / "cluster/kuberay/rayjob-train.yaml")["spec"]
    (argv,) = simple_commands(job["entrypoint"])
    ctx = parse(*click_command(argv))
    flags = {k: v for k, v in ctx.params.items() if v is not None}
    assert flags["run_name"], "the RayJob needs a fixed --run-name to resume when resubmitted"
    config_file = REPO / Path(flags.pop("config")).relative_to(IMAGE_ROOT)
    flags.pop("address", None)
    cfg = load_config(TrainConfig, str(config_file), flags)
    assert cfg.storage_path.startswith("s3://") and cfg.data_root.startswith("s3://")
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1


def pydantic_unknown_keys(model: type, data: dict, where: str = "") -> list[str]:
    """Keys of `data` that `model` (a pydantic schema) does not define, at any depth. Serve's schemas ignore
    unknown keys silently, which is how retired names such as max_concurrent_queries go unnoticed."""
    from pydantic import BaseModel

    def submodel(annotation: Any) -> type | None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for a in getattr(annotation, "__args__", ()) if (m := submodel(a))), None)

    unknown = []
    for key, value in data.items():
        if key not in model.model_fields:
            unknown.append(where + key)
            continue
        sub = submodel(model.model_fields[key].annotation)
        if sub and isinstance(value, dict):
            unknown += pydantic_unknown_keys(sub, value, f"{where}{key}.")
        elif sub and isinstance(value, list):
            for i, item in enumerate(value):
                unknown += pydantic_unknown_keys(sub, item, f"{where}{key}[{i}].") if isinstance(item, dict) else []
    return unknown


def test_serve_config_and_rayservice_agree_and_deploy_rayimgcls() -> None:
    from ray.serve.schema import ServeDeploySchema

    from rayimgcls.serve import build_app

    config = load(REPO / "cluster/serve_config.yaml")
    service = load(REPO / "cluster/kuberay/rayservice.yaml")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    ServeDeploySchema.model_validate(config)
    assert pydantic_unknown_keys(ServeDeploySchema, config) == []
    assert pydantic_unknown_keys(ServeDeploySchema, {"applications": [{"max_concurrent_queries": 1}]}) == [
        "applications[0].max_concurrent_queries"
    ]
    assert config["http_options"]["host"] == "0.0.0.0"  # on purpose, and said so in the file
    for application in config["applications"]:
        module, _, attr = application["import_path"].partition(":")
        assert getattr(import_module(module), attr) is build_app
        check_keys(ServeConfig, application["args"], "args")
        load_config(ServeConfig, overrides=application["args"])  # every value converts and passes the checks


def test_clusters_that_can_serve_require_the_api_key_secret() -> None:
    """An endpoint on these clusters binds 0.0.0.0: a Secret marked optional would open it silently when missing."""
    specs = kuberay_cluster_specs()
    for name in ("raycluster.yaml", "rayservice.yaml"):
        for container in containers(specs[name]):
            (key,) = [e for e in container["env"] if e["name"] == "RAYIMGCLS_API_KEY"]
            ref = key["valueFrom"]["secretKeyRef"]
            assert ref["name"] and not ref.get("optional"), (name, ref)
            # the Serve settings `rayimgcls serve` gives a local Ray, on every node
            assert THROUGHPUT_ENV.items() <= {e["name"]: e.get("value") for e in container["env"]}.items(), name


def test_job_files() -> None:
    from ray.runtime_env import RuntimeEnv

    runtime_env = load(REPO / "jobs/runtime_env.yaml")
    RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    assert runtime_env["working_dir"] == "."
    train = load_config(TrainConfig, str(REPO / "jobs/train.yaml"))
    assert train.run_name and train.storage_path.startswith("s3://") and train.data_root.startswith("s3://")
    infer = load_config(InferConfig, str(REPO / "jobs/infer.yaml"))
    assert infer.model_dir == f"{train.storage_path}/{train.run_name}/model"
    for script in ("submit.sh", "submit_train.sh", "submit_infer.sh"):
        assert os.access(REPO / "jobs" / script, os.X_OK), script


# ---------------------------------------------------------------------------------------------------------
# A multi-node cluster on this machine


class LocalCluster:
    """`ray start --block` head and workers as subprocesses, each a node with its own CPUs. Isolated from any
    other Ray on the machine: every port is a free one, the temp dir and HOME are our own. Token authentication
    is on (the token is written where `ray get-auth-token --generate` puts it). Stopping signals only the
    processes started here and their descendants."""

    def __init__(self, home: Path, workdir: Path, node_env: dict[str, str], workers: int) -> None:
        self.home, self.workdir, self.workers = home, workdir, workers
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ri-"))  # short: Ray's socket paths must fit 107 bytes
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(16)
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(self.token)
        self.env = {**base_env(home), **node_env, "RAY_AUTH_MODE": "token"}
        self.procs: list[subprocess.Popen] = []
        self.metrics_ports: dict[str, int] = {}  # node name -> its metrics agent's port

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, *args: str) -> None:
        ports = [
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--node-manager-port",
            "--object-manager-port",
        ]
        argv = [
            ray_bin("ray"),
            "start",
            "--block",
            "--num-cpus",
            "1",
            "--object-store-memory",
            str(200 << 20),
            "--disable-usage-stats",
            *args,
            *(x for p in ports for x in (p, str(free_port()))),
        ]
        self.metrics_ports[name] = int(argv[argv.index("--metrics-export-port") + 1])
        log = (self.temp_dir / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen(argv, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 120
        while "Ray runtime started" not in (self.temp_dir / f"{name}.log").read_text():
            if self.procs[-1].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n" + (self.temp_dir / f"{name}.log").read_text())
            time.sleep(0.5)

    def start(self) -> None:
        self._start(
            "head",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--ray-client-server-port",
            str(free_port()),
            "--temp-dir",
            str(self.temp_dir),
        )
        for i in range(self.workers):
            self._start(f"worker{i}", "--address", self.gcs, "--node-ip-address", "127.0.0.1")

    def stop(self) -> None:
        started = [p.pid for p in self.procs]
        family = started + [d for pid in started for d in descendants(pid)]
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)  # ray start --block stops the node's processes on SIGTERM
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(1)
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without Ray or AWS settings, with its own HOME and this Python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


API_KEY = "cluster-test-key"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server: S3Server) -> Iterator[LocalCluster]:
    """Three nodes of one CPU each, so two training workers of one CPU cannot share a node, and a CPU is left
    for Ray Data. The nodes know the Serve API key (as exported before `ray start`) but nothing of S3."""
    root = tmp_path_factory.mktemp("cluster")
    (root / "home").mkdir()
    (root / "work").mkdir()
    env = {"RAYIMGCLS_API_KEY": API_KEY, "RAY_metrics_report_interval_ms": "1000"}  # metrics: test_telemetry
    nodes = LocalCluster(root / "home", root / "work", env, workers=2)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory, s3_server: S3Server) -> str:
    from rayimgcls.synth import SynthConfig, make_dataset

    local = make_dataset(
        tmp_path_factory.mktemp("cluster_data"), SynthConfig(num_images=64, min_size=32, max_size=48, seed=11)
    )
    return s3_server.upload(local, "cluster", "data")


def run_cli(
    cluster: LocalCluster, s3: S3Server, *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """A command as a user on the client would run it: S3 settings in the shell, token mode on, the cluster's
    working directory (an empty folder that must stay empty)."""
    full_env = {**base_env(cluster.home), **s3.env, "RAY_AUTH_MODE": "token", **(env or {})}
    try:
        proc = subprocess.run(
            list(args), env=full_env, cwd=cluster.workdir, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:  # what it printed is the clue to where it hung
        pytest.fail(
            f"{args[:4]} still running after {timeout} s:\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-5000:]!r}"
        )
    assert proc.returncode == 0, f"{args[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


RECIPE_KNOBS = ["--augment", "none", "--crop-mode", "squash", "--grad-accum-steps", "2", "--clip-grad", "1.0"]
RECIPE_KNOBS += ["--model-ema", "--model-ema-warmup", "--class-weights", "auto"]
RECIPE_STORED = {"augment": "none", "crop_mode": "squash", "grad_accum_steps": 2, "clip_grad": 1.0}
RECIPE_STORED |= {"model_ema": True, "model_ema_warmup": True, "class_weights": "auto"}
TINY_TRAIN = [
    "--model",
    "vit_tiny_patch16_224",
    "--model-kwargs",
    json.dumps(TINY_VIT),
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--logging-steps",
    "1",
    "--learning-rate",
    "0.001",
    "--precision",
    "fp32",
    "--torch-threads",
    "1",
    "--no-random-resized-crop",
    "--color-jitter",
    "0",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multi_node_training_inference_and_serving_with_everything_on_s3(cluster, s3_server, s3_data) -> None:
    s3 = s3_server
    runs, preds = s3.uri("cluster", "runs"), s3.uri("cluster", "preds")
    train = [
        sys.executable,
        "-m",
        "rayimgcls.train",
        "--address",
        cluster.gcs,
        "--data-root",
        s3_data,
        "--storage-path",
        runs,
        "--run-name",
        "multinode",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "1",
        *TINY_TRAIN,
    ]
    run_cli(cluster, s3, *train, "--num-epochs", "1")
    out = run_cli(cluster, s3, *train, "--num-epochs", "2").stdout  # the same run, longer: resumes from S3
    assert "resuming run multinode" in out

    run_files = s3.keys("cluster", "runs", "multinode")
    assert {
        "config.yaml",
        "metrics.jsonl",
        "workers.json",
        "curves.png",
        "summary.json",
        "model/model.safetensors",
        "model/config.json",
    } <= set(run_files)
    assert len([f for f in run_files if f.startswith("tensorboard/")]) == 1  # the resume rewrote it, on S3
    assert {f.split("/")[0] for f in run_files if f.startswith("checkpoint_epoch_")} == {
        "checkpoint_epoch_0001",
        "checkpoint_epoch_0002",
    }
    workers = json.loads(read(s3, "cluster/runs/multinode/workers.json"))
    assert [w["rank"] for w in workers] == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, workers  # two nodes, not two processes on one
    metrics = [json.loads(x) for x in read(s3, "cluster/runs/multinode/metrics.jsonl").splitlines()]
    epochs = {m["epoch"]: m["step"] for m in metrics if m["type"] == "epoch"}
    assert list(epochs) == [1, 2]
    assert [(m["epoch"], m["step"]) for m in metrics if m["type"] == "resume"] == [(1, epochs[1])]

    model = f"{runs}/multinode/model"
    run_cli(
        cluster,
        s3,
        sys.executable,
        "-m",
        "rayimgcls",
        "infer",
        "--address",
        cluster.gcs,
        "--model-dir",
        model,
        "--data-root",
        s3_data,
        "--result-dir",
        preds,
        "--batch-size",
        "8",
    )
    lines = [json.loads(x) for x in read(s3, "cluster/preds/predictions-00000.jsonl").splitlines()]
    expected = read(s3, "cluster/data/predictions.csv").splitlines()[1:]
    assert len(lines) == len(expected) and all("predictions" in x for x in lines)
    assert set(s3.keys("cluster", "preds")) == {"manifest.json", "predictions-00000.jsonl"}

    probs = classify_over_http(cluster, s3, model, image=read_bytes(s3, f"cluster/data/{lines[0]['input']}"))
    assert max(abs(a - b) for a, b in zip(probs, lines[0]["predictions"], strict=True)) < 1e-5

    # Only Ray's token file in HOME (besides library caches such as matplotlib's font list), and the working
    # directory is as empty as it started: every byte of the run went to S3 or to temporary folders.
    assert [f for f in files_under(cluster.home) if not f.startswith(".cache/")] == [".ray/auth_token"]
    assert files_under(cluster.workdir) == []


def read_bytes(s3: S3Server, key: str) -> bytes:
    with s3.filesystem().open_input_file(f"{s3.uri()[5:]}/{key}") as f:
        return f.read()


def read(s3: S3Server, key: str) -> str:
    return read_bytes(s3, key).decode()


def classify_over_http(cluster: LocalCluster, s3: S3Server, model_dir: str, image: bytes) -> list[float]:
    """`serve deploy` cluster/serve_config.yaml (model on S3, loopback port, proxy on the head only: three nodes
    on one machine cannot all bind one port), then one query with the nodes' API key and one without."""
    config = load(REPO / "cluster/serve_config.yaml")
    port = free_port()
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    (application,) = config["applications"]
    application["args"]["model_dir"] = model_dir
    application["runtime_env"] = {"env_vars": s3.env}  # the nodes know no S3; the replicas must
    path = cluster.home.parent / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    run_cli(cluster, s3, ray_bin("serve"), "deploy", str(path), "--address", cluster.dashboard)
    try:
        probs = query_deployed_app(f"http://127.0.0.1:{port}", image)
        check_cluster_metrics(cluster)
        return probs
    finally:  # stop what the test started: the replicas' CPUs are the next test's training workers
        run_cli(cluster, s3, ray_bin("serve"), "shutdown", "--address", cluster.dashboard, "--yes")


def check_cluster_metrics(cluster: LocalCluster) -> None:
    """Prometheus' view of the cluster: the head's service-discovery file lists every node's metrics port, a worker
    node's port answers with Ray's metrics, and the endpoint's counters, summed over the nodes, show the one
    classify request and the one refused for its missing key (query_deployed_app)."""
    session = cluster.temp_dir / "session_latest"
    # Ray writes the nodes' addresses as it sees them (this machine's, not the --node-ip-address): match the ports.
    ports = {int(t.rsplit(":", 1)[1]) for t in discovery_targets(session)}
    assert set(cluster.metrics_ports.values()) <= ports, (ports, cluster.metrics_ports)
    with requests.get(f"http://127.0.0.1:{cluster.metrics_ports['worker0']}/metrics", timeout=10) as r:
        assert r.status_code == 200 and "ray_" in r.text, r.text[:500]

    def measure(s: list[Sample]) -> dict[str, float]:
        req = "rayimgcls_serve_requests_total"
        return {
            "200": total(s, req, application="rayimgcls", route="/v1/classify", status="200"),
            "401": total(s, req, application="rayimgcls", route="/v1/classify", status="401"),
            "unauthorized": total(s, "rayimgcls_serve_errors_total", application="rayimgcls", code="unauthorized"),
            "images": total(s, "rayimgcls_serve_batch_size_count", application="rayimgcls"),
        }

    wait_for({"200": 1, "401": 1, "unauthorized": 1, "images": 1}, measure, session, wait_s=90)


def query_deployed_app(url: str, image: bytes) -> list[float]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(f"{url}/v2/health/ready", headers=headers, timeout=5).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):  # the proxy is up before the application is
            pass
        assert time.time() < deadline, "the Serve application did not become ready"
        time.sleep(1)
    assert requests.post(f"{url}/v1/classify", data=image, timeout=30).status_code == 401
    answer = requests.post(f"{url}/v1/classify", data=image, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["predictions"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_scripts_submit_training_and_inference_with_token_auth(cluster, s3_server, s3_data, tmp_path) -> None:
    s3 = s3_server
    client = {"RAY_ADDRESS": cluster.dashboard}  # and no RAY_AUTH_MODE: the scripts must set it
    env = {**base_env(cluster.home), **s3.env, **client}
    plain = subprocess.run(
        [ray_bin("ray"), "job", "list", "--address", cluster.dashboard],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode != 0 and "authentication token" in plain.stdout + plain.stderr

    runs = s3.uri("cluster", "job-runs")
    train = subprocess.run(
        [
            str(REPO / "jobs/submit_train.sh"),
            "jobs/train.yaml",
            "--data-root",
            s3_data,
            "--storage-path",
            runs,
            "--run-name",
            "job",
            "--num-workers",
            "1",
            "--no-use-gpu",
            "--num-epochs",
            "1",
            "--max-failures",
            "0",
            "--weight-decay",
            "0",
            *TINY_TRAIN,
            *RECIPE_KNOBS,  # issue 14's knobs reach the workers of a submitted job the same way
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    assert "succeeded" in train.stdout + train.stderr
    infer = subprocess.run(
        [
            str(REPO / "jobs/submit_infer.sh"),
            "--model-dir",
            f"{runs}/job/model",
            "--data-root",
            s3_data,
            "--result-dir",
            s3.uri("cluster", "job-preds"),
            "--no-use-gpu",
            "--batch-size",
            "8",
            "--num-actors",
            "1",
        ],
        env=env,
        cwd=cluster.workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert infer.returncode == 0, infer.stdout[-4000:] + infer.stderr[-4000:]
    assert "predictions-00000.jsonl" in s3.keys("cluster", "job-preds")
    assert "model/model.safetensors" in s3.keys("cluster", "job-runs", "job")
    assert_tensorboard_matches_metrics(s3, "cluster/job-runs/job", tmp_path)
    stored = yaml.safe_load(read(s3, "cluster/job-runs/job/config.yaml"))
    assert stored | RECIPE_STORED == stored  # what the workers were given
    epochs = [
        x for x in map(json.loads, read(s3, "cluster/job-runs/job/metrics.jsonl").splitlines()) if x["type"] == "epoch"
    ]
    assert epochs and all(x["weights"] in ("ema", "raw") for x in epochs)  # the EMA was kept and scored
    card = json.loads(read(s3, "cluster/job-runs/job/model/config.json"))
    assert card["preprocess"]["crop_mode"] == "squash"  # and the crop mode reached the model directory


def assert_tensorboard_matches_metrics(s3: S3Server, run: str, tmp_path: Path) -> None:
    """The submitted job's TensorBoard log (written by rank 0 on a worker node, uploaded to S3) read back with
    TensorBoard's own reader: the loss of every logged step of metrics.jsonl, once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (name,) = [k for k in s3.keys(*run.split("/")) if k.startswith("tensorboard/")]
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_bytes(read_bytes(s3, f"{run}/{name}"))
    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    steps = [json.loads(x) for x in read(s3, f"{run}/metrics.jsonl").splitlines()]
    expected = [m for m in steps if m["type"] == "step"]
    got = events.Scalars("train/loss")
    assert [e.step for e in got] == [m["step"] for m in expected]
    assert [e.value for e in got] == pytest.approx([m["loss"] for m in expected], rel=1e-6)
