"""Prometheus metrics through Ray's pipeline, read back the way Prometheus reads them: the targets from the
service-discovery file Ray writes in its session directory, each node's metrics port scraped over HTTP on
loopback, the text parsed by prometheus_client. Real requests (good and bad) to the module's Serve app, a real
batch-inference run, and the training hook driven from a Ray actor; every counter must move by exactly what
was done. Ray exports every RAY_metrics_report_interval_ms (1 s in the tests, conftest.py): polled, bounded."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from test_serve import classify, files, png, url  # noqa: F401 - url: the module's Serve instance

from rayimgcls import telemetry
from rayimgcls.card import read_card
from rayimgcls.config import InferConfig

DISCOVERY_FILE = "prom_metrics_service_discovery.json"
APP = "plain"  # the 4-class application of test_serve's Serve instance
WAIT_S = 60.0  # export interval 1 s; a loaded 2-core machine can be many seconds late
Sample = tuple[str, dict[str, str], float]


def discovery_targets(session_dir: Path) -> list[str]:
    """host:port of every target in the Prometheus service-discovery file of a Ray session (the head's dashboard
    writes it, and rewrites it as nodes join)."""
    path = session_dir / DISCOVERY_FILE
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"Ray wrote no {path}"
        time.sleep(0.5)
    return [t for group in json.loads(path.read_text()) for t in group["targets"]]


def session_dir() -> Path:
    """The session directory of the test session's Ray (ray_session)."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_session_dir_path())


def scrape(session: Path | None = None, prefix: str = "ray_rayimgcls_") -> list[Sample]:
    """Every sample named `prefix`... of every target, as (name without Ray's `ray_`, labels, value). All the tests'
    nodes run on this machine, so each target's port is reached on 127.0.0.1 (the agent listens on every interface
    of its node); the file also lists the dashboard's and the autoscaler's metrics ports, which answer only while
    those export something."""
    out: list[Sample] = []
    for target in discovery_targets(session or session_dir()):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{target.rsplit(':', 1)[1]}/metrics", timeout=10) as r:
                text = r.read().decode()
        except urllib.error.URLError:
            continue
        for family in text_string_to_metric_families(text):
            out += [
                (s.name.removeprefix("ray_"), s.labels, s.value) for s in family.samples if s.name.startswith(prefix)
            ]
    return out


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum over Ray's per-process series (WorkerId, replica, ...) of `name` with these labels."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def wait_for(
    expected: dict[str, float],
    measure: Callable[[list[Sample]], dict[str, float]],
    session: Path | None = None,
    wait_s: float = WAIT_S,
) -> dict[str, float]:
    """Scrape until `measure` gives `expected` (counters that moved too far never do: the test fails)."""
    deadline = time.monotonic() + wait_s
    while True:
        got = measure(scrape(session))
        if all(abs(got[k] - v) < 1e-6 for k, v in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    wrong = {k: (got[k], v) for k, v in expected.items() if abs(got[k] - v) >= 1e-6}
    assert not wrong, f"(scraped, expected) after {wait_s} s: {wrong}"
    return got


def settled(measure: Callable[[list[Sample]], dict[str, float]]) -> dict[str, float]:
    """A baseline that two scrapes 2.5 export intervals apart agree on (nothing still on its way)."""
    before = measure(scrape())
    while True:
        time.sleep(2.5)
        now = measure(scrape())
        if now == before:
            return now
        before = now


def test_discovery_file_lists_this_node(ray_session) -> None:
    import ray

    node = ray._private.worker.global_worker.node
    target, deadline = f"{node.node_ip_address}:{node.metrics_export_port}", time.monotonic() + WAIT_S
    while target not in (targets := discovery_targets(session_dir())):  # the file is written before nodes register
        assert time.monotonic() < deadline, f"{target} not in {targets}"
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------------
# Batch inference


@pytest.mark.timeout(240)
def test_batch_inference_rows_errors_and_shards(ray_session, shapes_root, model_dir, tmp_path) -> None:
    from rayimgcls.infer import run_inference
    from rayimgcls.results import read_manifest

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    paths = []
    for i, line in enumerate((shapes_root / "labels.csv").read_text().splitlines()[1:7]):
        (root / "images" / f"{i}.jpg").write_bytes((shapes_root / line.split(",")[0]).read_bytes())
        paths.append(f"images/{i}.jpg")
    (root / "images" / "text.jpg").write_bytes(b"this is not an image\n")
    paths += ["images/text.jpg", "images/missing.jpg"]
    (root / "predictions.csv").write_text("image_path\n" + "\n".join(paths) + "\n")
    out = tmp_path / "result"
    cfg = InferConfig(model_dir=str(model_dir), data_root=str(root), result_dir=str(out), rows_per_shard=3)
    # The rows/s gauge is set by the same call as these counters (telemetry.infer_progress) but lives only ~2
    # export intervals after the driver's last set, which a fast run can end inside: it is checked from a live
    # process below (test_infer_rate_gauge_from_a_live_process), the counters here.
    summary = run_inference(cfg)
    assert (summary.lines, summary.errors, summary.shards_written) == (8, 2, 3)

    manifest = read_manifest(str(out))
    run = telemetry.infer_run_id(str(out), manifest["input"]["sha256"], manifest["model"]["version"])

    def measure(s: list[Sample]) -> dict[str, float]:
        errors = "rayimgcls_infer_errors_total"
        return {
            "rows": total(s, "rayimgcls_infer_rows_total", run=run),
            "shards": total(s, "rayimgcls_infer_shards_total", run=run),
            "not found": total(s, errors, run=run, reason="file_not_found"),
            "unsupported": total(s, errors, run=run, reason="unsupported_format"),
            "all errors": total(s, errors, run=run),
        }

    wait_for({"rows": 8, "shards": 3, "not found": 1, "unsupported": 1, "all errors": 2}, measure)


@contextlib.contextmanager
def recorded_in_a_live_actor(ray, record: Callable[[], None]) -> Iterator[None]:
    """`record()` run in a Ray actor (as a Train worker or a driver would record), which stays up until the block
    ends: Ray 2.60's agent drops a gauge about two export intervals after its last set, so a gauge is scraped
    while the process that set it lives."""

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self, fn: Callable[[], None]) -> None:
            fn()

    actor = Recorder.remote()
    try:
        ray.get(actor.record.remote(record))
        yield
    finally:
        ray.kill(actor)


def test_infer_rate_gauge_from_a_live_process(ray_session) -> None:
    """The rows/s gauge of batch inference, set as the driver sets it, from a process that stays up while scraped."""
    run = f"infer-{time.time_ns()}"

    def measure(s: list[Sample]) -> dict[str, float]:
        return {
            "rows/s": total(s, "rayimgcls_infer_rows_per_second", run=run),
            "rows": total(s, "rayimgcls_infer_rows_total", run=run),
        }

    with recorded_in_a_live_actor(ray_session, lambda: telemetry.infer_progress(run, 8, ["file not found"], 3, 12.5)):
        wait_for({"rows/s": 12.5, "rows": 8}, measure)


def test_infer_reasons_are_a_fixed_set() -> None:
    texts = {
        "file not found": "file_not_found",
        "cannot read file: Permission denied": "unreadable",
        "empty image: zero bytes": "empty",
        "image path '../x.jpg' escapes the data root /d": "path_escape",
        "not a supported image format (accepted: JPEG, PNG)": "unsupported_format",
        "cannot decode PNG: image file is truncated": "truncated",
        "cannot decode JPEG: broken data stream": "undecodable",
        "70000x70000 = 4900000000 pixels exceeds the limit of 89478485": "too_many_pixels",
        "something new": "other",
    }
    assert {t: telemetry.infer_reason(t) for t in texts} == texts


# ---------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.timeout(120)
def test_training_hook_from_a_ray_actor(ray_session) -> None:
    """The figures a training loop logs, recorded from a Ray actor (as a Train worker would) and scraped back."""
    run = f"telemetry-{time.time_ns()}"

    def steps() -> None:
        telemetry.train_step(run, images_per_s=250.0, data_wait=0.04, step_seconds=0.2, loss=1.5)
        telemetry.train_step(run, images_per_s=300.0, data_wait=0.02, step_seconds=0.3, loss=1.25)
        telemetry.train_checkpoint(run, "val_top1", 0.75)
        telemetry.train_restarted(run)

    def measure(s: list[Sample]) -> dict[str, Any]:
        return {
            "images/s": total(s, "rayimgcls_train_images_per_second", run=run),
            "data wait": total(s, "rayimgcls_train_data_wait_ratio", run=run),
            "loss": total(s, "rayimgcls_train_loss", run=run),
            "steps": total(s, "rayimgcls_train_step_seconds_count", run=run),
            "under 0.25 s": total(s, "rayimgcls_train_step_seconds_bucket", run=run, le="0.25"),
            "under 0.5 s": total(s, "rayimgcls_train_step_seconds_bucket", run=run, le="0.5"),
            "checkpoint": total(s, "rayimgcls_train_checkpoint_metric", run=run, metric="val_top1"),
            "restarts": total(s, "rayimgcls_train_worker_restarts_total", run=run),
        }

    expected = {"images/s": 300, "data wait": 0.02, "loss": 1.25, "steps": 2, "under 0.25 s": 1, "under 0.5 s": 2}
    with recorded_in_a_live_actor(ray_session, steps):
        wait_for(expected | {"checkpoint": 0.75, "restarts": 1}, measure)


@pytest.mark.timeout(300)
def test_training_run_exports_its_figures(ray_session, shapes_root, tmp_path) -> None:
    """A real two-epoch training run, scraped while it runs: rank 0's logging steps (a histogram, kept after the
    run) and its gauges (loss, the checkpoint metric: exported while the worker lives) equal what metrics.jsonl
    says."""

    from test_train import tiny_config

    from rayimgcls.train import run

    name, seen = "telemetry-run", {"loss": set(), "checkpoint": set()}
    result: dict[str, Any] = {}
    trainer = threading.Thread(
        target=lambda: result.update(run(tiny_config(shapes_root, tmp_path / "runs", name, num_epochs=2)))
    )
    trainer.start()
    while trainer.is_alive():
        samples = scrape()
        seen["loss"] |= {v for n, lab, v in samples if n == "rayimgcls_train_loss" and lab.get("run") == name}
        seen["checkpoint"] |= {
            v for n, lab, v in samples if n == "rayimgcls_train_checkpoint_metric" and lab.get("run") == name
        }
        time.sleep(0.5)
    trainer.join()
    lines = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "step"]
    epochs = [x[result["metric"]] for x in lines if x["type"] == "epoch"]
    # A gauge holds the last value set: a fast epoch can replace the one before it between two exports, so
    # what was seen must be among the logged values, not all of them.
    assert seen["loss"] and seen["loss"] <= {x["loss"] for x in steps}, seen["loss"]
    assert seen["checkpoint"] and seen["checkpoint"] <= set(epochs), (seen["checkpoint"], epochs)

    def measure(s: list[Sample]) -> dict[str, float]:
        return {"steps": total(s, "rayimgcls_train_step_seconds_count", run=name)}

    wait_for({"steps": len(steps)}, measure)


# ---------------------------------------------------------------------------------------------------------
# The endpoint: last in this file, because the module's Serve instance (test_serve.url) holds CPUs until the
# module ends, and batch inference needs them.


def serve_counters(version: str) -> Callable[[list[Sample]], dict[str, float]]:
    def measure(s: list[Sample]) -> dict[str, float]:
        req, err = "rayimgcls_serve_requests_total", "rayimgcls_serve_errors_total"
        out = {
            f"{route} {status}": total(s, req, application=APP, route=route, status=status)
            for route, status in [
                ("/v1/classify", "200"),
                ("/v1/classify", "400"),
                ("/v1/classify", "422"),
                ("/v2/models/{name}/infer", "200"),
                ("/v2/models/{name}/infer", "404"),
                (telemetry.UNMATCHED_ROUTE, "404"),
            ]
        }
        codes = ["empty_body", "bad_top_k", "undecodable", "not_found"]
        out |= {f"code {c}": total(s, err, application=APP, code=c) for c in codes}
        for h in ("images_per_request", "decode_seconds", "queue_model_seconds", "batch_size", "model_seconds"):
            out[f"{h} count"] = total(s, f"rayimgcls_serve_{h}_count", application=APP)
        # Bucket counts, not _sum: Ray 2.60 exports a histogram's sum from bucket midpoints (approximate).
        for le in ("1.0", "4.0"):
            out[f"images_per_request le={le}"] = total(
                s, "rayimgcls_serve_images_per_request_bucket", application=APP, le=le
            )
        for k in range(4):
            out[f"class {k}"] = total(
                s, "rayimgcls_serve_predictions_total", application=APP, version=version, **{"class": str(k)}
            )
        conf = "rayimgcls_serve_confidence"
        out["confidence count"] = total(s, f"{conf}_count", application=APP, version=version)
        for le in [*map(str, telemetry.CONFIDENCE_BUCKETS), "+Inf"]:
            out[f"confidence le={le}"] = total(s, f"{conf}_bucket", application=APP, version=version, le=le)
        return out

    return measure


@pytest.mark.timeout(180)
def test_endpoint_requests_errors_latencies_batches_and_predictions(url, model_dir) -> None:  # noqa: F811
    version = read_card(model_dir).version
    measure = serve_counters(version)
    before = settled(measure)

    ok = [classify(url, png(1)), classify(url, png(2)), classify(url, files=files(png(3), png(4), png(5)))]
    assert [r.status_code for r in ok] == [200, 200, 200], [r.text for r in ok]
    bad = {
        "empty_body": classify(url, b""),
        "bad_top_k": classify(url, png(1), query="?top_k=99"),
        "undecodable": classify(url, b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
        "not_found": requests.get(f"{url}/no/such/route", timeout=30),
    }
    assert {c: r.status_code for c, r in bad.items()} == {
        "empty_body": 400,
        "bad_top_k": 400,
        "undecodable": 422,
        "not_found": 404,
    }, {c: r.text for c, r in bad.items()}
    assert bad["undecodable"].json()["code"] == "undecodable"
    oip = requests.post(f"{url}/v2/models/nope/infer", json={"inputs": []}, timeout=30)
    assert oip.status_code == 404, oip.text

    top1 = [r["top_k"][0] for resp in ok for r in resp.json()["results"]]
    classes = Counter(t["index"] for t in top1)
    expected = {k: before[k] for k in before} | {
        "/v1/classify 200": before["/v1/classify 200"] + 3,
        "/v1/classify 400": before["/v1/classify 400"] + 2,
        "/v1/classify 422": before["/v1/classify 422"] + 1,
        "/v2/models/{name}/infer 404": before["/v2/models/{name}/infer 404"] + 1,
        f"{telemetry.UNMATCHED_ROUTE} 404": before[f"{telemetry.UNMATCHED_ROUTE} 404"] + 1,
        "code empty_body": before["code empty_body"] + 1,
        "code bad_top_k": before["code bad_top_k"] + 1,
        "code undecodable": before["code undecodable"] + 1,
        "code not_found": before["code not_found"] + 2,  # the unknown route and the unknown model
        # the three requests that decoded: 1 + 1 + 3 images
        "images_per_request count": before["images_per_request count"] + 3,
        "images_per_request le=1.0": before["images_per_request le=1.0"] + 2,
        "images_per_request le=4.0": before["images_per_request le=4.0"] + 3,
        "decode_seconds count": before["decode_seconds count"] + 3,
        "queue_model_seconds count": before["queue_model_seconds count"] + 3,
        "confidence count": before["confidence count"] + 5,
        **{
            f"confidence le={b}": before[f"confidence le={b}"] + sum(t["score"] <= b for t in top1)
            for b in telemetry.CONFIDENCE_BUCKETS
        },
        "confidence le=+Inf": before["confidence le=+Inf"] + 5,
        **{f"class {k}": before[f"class {k}"] + classes[k] for k in range(4)},
    }
    del expected["batch_size count"], expected["model_seconds count"]  # how many batches is Serve's business
    got = wait_for(expected, measure)
    batches = got["batch_size count"] - before["batch_size count"]
    assert 1 <= batches <= 5 and got["model_seconds count"] - before["model_seconds count"] == batches
