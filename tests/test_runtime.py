"""runtime.py: connecting to Ray and refusing what a cluster can never give, on the session's local Ray."""

from __future__ import annotations

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
