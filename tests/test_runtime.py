"""runtime.py: connecting to Ray and refusing what a cluster can never give, on the session's local Ray."""

from __future__ import annotations

import contextlib
import time

import pytest

from rayimgcls import runtime
from rayimgcls.config import ConfigError
from rayimgcls.runtime import ResourceError, can_add_nodes, check_resources, init_ray, max_is_known, with_s3_env


def test_a_dashboard_address_is_refused_with_what_to_do_instead(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"dashboard address.*jobs/submit_train\.sh.*HEAD:6379"):
        init_ray("http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_ADDRESS", "https://head.example:8265")
    with pytest.raises(ConfigError, match="'https://head.example:8265' is a dashboard address"):
        init_ray()


def test_impossible_requests_are_refused_on_a_fixed_cluster(ray_session) -> None:
    assert max_is_known()
    with pytest.raises(ResourceError, match=r"1 GPU\(s\) requested, the cluster has 0"):
        check_resources("training", gpus=1)
    with pytest.raises(ResourceError, match=r"64 CPU\(s\) requested, the cluster has 2"):
        check_resources("training", cpus=64)
    check_resources("training", cpus=2)  # exactly what there is: fine


def test_a_fixed_clusters_monitor_is_told_from_a_launchers_autoscaler(ray_session) -> None:
    """Every Ray runs the autoscaler monitor; only a launcher's can add nodes. Read the session's real status."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.time() + 30
    while not (status := _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)) and time.time() < deadline:
        time.sleep(0.5)  # the monitor publishes every few seconds
    assert status and not can_add_nodes(json.loads(status))
    launched = {"autoscaler_report": {"node_type_mapping": {"a1": "head", "b2": "gpu_worker"}}}
    assert can_add_nodes(launched)


def test_an_autoscaling_cluster_that_hides_its_maximum_gets_a_warning_not_a_refusal(
    ray_session, monkeypatch, caplog
) -> None:
    """A GPU request on a `ray up` cluster whose GPU nodes are scaled to zero must wait for them, not fail."""
    monkeypatch.setattr(runtime, "max_is_known", lambda: False)
    runtime.check_resources("training", gpus=4)
    assert "4 GPU(s) requested, the cluster has 0 now; waiting for the autoscaler" in caplog.text


def test_s3_settings_join_a_runtime_env_without_overriding_it(monkeypatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    env = with_s3_env({"working_dir": ".", "env_vars": {"AWS_DEFAULT_REGION": "us-east-2"}})
    assert env == {
        "working_dir": ".",
        "env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "us-east-2"},
    }
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert with_s3_env({"working_dir": "."}) == {"working_dir": "."}


# ---------------------------------------------------------------------------------------------------------
# The local default survives a stale cluster record (issue 10, item 11)


def _ray_processes(marker: str) -> list[int]:
    """Pids of the Ray we started: every process of it names its temp dir (unique to the test) on its command line."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def _kill(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(420)
def test_a_stale_cluster_record_is_skipped_and_a_dead_address_named(shapes_root) -> None:
    """A `ray start` head killed without `ray stop` leaves its address in ray_current_cluster, where a plain
    ray.init() then waits for minutes. Our own head, on its own port, with its own RAY_TMPDIR (so the record is
    ours alone and no other Ray on this machine is touched): joined while alive, skipped with a warning once
    killed by pid, and named within seconds when given as --address."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from conftest import free_port

    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")} | {"RAY_TMPDIR": tmp}
    port = free_port()
    record = Path(tmp) / "ray" / "ray_current_cluster"
    validate = [sys.executable, "-m", "rayimgcls", "validate", str(shapes_root), "--ray-above", "0"]
    try:
        started = subprocess.run(
            ["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, started.stderr[-2000:]
        assert record.read_text().strip().endswith(f":{port}")
        live = subprocess.run(validate, env=env, capture_output=True, text=True, timeout=180)
        assert live.returncode == 0 and f"joining the Ray cluster at {record.read_text().strip()}" in live.stderr
        _kill(_ray_processes(tmp))  # killed, not `ray stop`-ped: the record stays behind
        time.sleep(1)
        assert record.exists()
        stale = subprocess.run(validate, env=env, capture_output=True, text=True, timeout=180)
        assert stale.returncode == 0, stale.stderr[-3000:]
        assert (
            f"ignoring {record}: it names a Ray cluster at" in stale.stderr and "starting a local Ray" in stale.stderr
        )
        begin = time.monotonic()
        address = record.read_text().strip()
        dead = subprocess.run([*validate, "--address", address], env=env, capture_output=True, text=True, timeout=60)
        assert time.monotonic() - begin < 30
        assert dead.returncode == 2 and f"Ray cluster at {address} does not answer" in dead.stderr, dead.stderr
        assert "Traceback" not in dead.stderr
    finally:
        _kill(_ray_processes(tmp))
        if record.exists() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
