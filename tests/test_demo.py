"""demo.py: the whole pipeline (data -> train -> infer -> evaluate) end to end, small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayimgcls.demo import run_demo


@pytest.mark.timeout(600)
def test_demo_runs_every_stage(ray_session, tmp_path, capsys):
    result = run_demo(str(tmp_path / "demo"), num_images=120, num_epochs=2)
    out = capsys.readouterr().out
    for stage in (
        "1/4 dataset",
        "2/4 training",
        "3/4 batch inference",
        "4/4 evaluation",
        "demo done in",
        "rayimgcls serve --model-dir",
        "epoch   2/2  train_loss",  # the epoch rows, from rank 0 through Ray
        f"evaluation:  {result.result_dir}/report.html",
    ):
        assert stage in out
    assert (Path(result.model_dir).parent / "report.html").exists()  # the training report
    assert (Path(result.model_dir) / "model.safetensors").exists()
    manifest = json.loads((Path(result.result_dir) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["input"]["rows"] == 16  # the test subset of 120 images
    assert 0.0 <= result.accuracy <= 1.0
