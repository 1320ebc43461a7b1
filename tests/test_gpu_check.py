"""benchmarks/gpu_check.py: the dry run (the whole GPU check on the CPU, tiny sizes) runs end to end in its own
process, with its own local Ray, and writes a JSON in which every stage ran, every figure is finite and parity
held; the tier without Ray too; and on a machine without a GPU the real check stops at once, naming the stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_check(out: Path, *flags: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, never a cluster another test started
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def numbers(value) -> list[float]:
    """Every int or float anywhere in a JSON document."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [x for v in items for x in numbers(v)]


def check_document(out: Path, proc: subprocess.CompletedProcess, tier: str, stages: list[str]) -> dict:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert (doc["mode"], doc["tier"]) == ("dry-run", tier)
    assert list(doc["stages"]) == stages
    assert all(s["ok"] for s in doc["stages"].values()), doc["stages"]
    assert all(math.isfinite(x) for x in numbers(doc)), "a figure is not finite"
    parity = doc["stages"]["parity"]
    for name in ("predictor_batch_vs_single_fp32", "predictor_batch_vs_single_bf16", "cpu_bf16_vs_cpu_fp32"):
        assert parity[name]["ok"] and parity[name]["max_abs_diff"] <= parity[name]["tolerance"]
    assert parity["predictor_batch_vs_single_fp32"]["tolerance"] == 1e-5
    assert parity["mean_prob_spread"] >= 0.02  # the model was trained: outputs are not uniform
    synthetic = doc["stages"]["synthetic"]
    assert synthetic["images_per_s"] > 0 and 0 < synthetic["mfu"] < 1
    # FlopCounterMode's count agrees with the ViT formula the MFU is explained by
    assert synthetic["forward_gflops_per_image"] == pytest.approx(synthetic["forward_gflops_formula"], rel=0.02)
    assert "RESULT dryrun_train_mfu" in proc.stdout
    assert "RESULT dryrun_train_mfu" in (out / "gpu_check.log").read_text()  # the log has what was printed
    return doc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_runs_every_stage_through_ray(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, "--dry-run", "--cpus", "2", timeout=850)
    doc = check_document(out, proc, "ray", ["versions", "decode", "synthetic", "train", "infer", "serve", "parity"])
    parity = doc["stages"]["parity"]
    for path in ("infer", "serve"):
        for precision, tol in (("fp32", 1e-5), ("bf16", 1e-3)):
            result = parity[f"{path}_vs_predictor_{precision}"]
            assert result["ok"] and result["tolerance"] == tol
    names = {r["name"] for r in doc["results"]}
    assert {"dryrun_train_vs_synthetic", "dryrun_infer_e2e_vs_model", "dryrun_serve_batching"} <= names
    for name in ("train_vs_synthetic", "infer_e2e_vs_model", "serve_batching"):
        assert f"RESULT dryrun_{name} ratio=" in proc.stdout
    serve = doc["stages"]["serve"]
    assert serve["batched"]["errors"] == 0 and serve["batched"]["p99_ms"] >= serve["batched"]["p50_ms"]
    assert doc["stages"]["train"]["steps_measured"] >= 1
    assert not (out / "work").exists()  # the work folder is cleaned up


@pytest.mark.timeout(300)
def test_dry_run_without_ray(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, "--dry-run", "--no-ray", timeout=280)
    doc = check_document(out, proc, "no-ray", ["versions", "decode", "synthetic", "predictor", "parity"])
    assert doc["stages"]["predictor"]["model_only_images_per_s"] > 0


@pytest.mark.timeout(120)
def test_without_a_gpu_the_real_check_stops_naming_the_stage(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check would run")
    out = tmp_path / "out"
    proc = run_check(out, "--no-ray", timeout=110)
    assert proc.returncode == 1
    assert "FAILED stages: versions" in proc.stdout and "no CUDA device" in proc.stdout
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["mode"] == "gpu" and doc["stages"]["versions"]["ok"] is False


@pytest.mark.timeout(200)
def test_a_rerun_runs_only_the_stages_asked_for(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, "--dry-run", "--no-ray", "--stages", "decode", timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert stages["versions"]["ok"] and stages["decode"]["ok"] and stages["decode"]["images_per_s_per_cpu"] > 0
    assert all(stages[name] == {"skipped": True} for name in ("synthetic", "predictor", "parity"))
    bad = run_check(tmp_path / "bad", "--dry-run", "--stages", "serv", timeout=60)
    assert bad.returncode != 0 and "--stages: unknown serv" in bad.stderr
