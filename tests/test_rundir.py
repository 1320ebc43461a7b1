"""rundir.py: the run directory's files, locally and on S3 (a moto server on loopback). The training tests
read the same files after real runs; these pin the rules a resume depends on."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from rayimgcls import storage
from rayimgcls.config import ConfigError, TrainConfig
from rayimgcls.dataset import Problem
from rayimgcls.rundir import (
    MetricsLog,
    RunDir,
    checkpoint_dir_name,
    data_fingerprint,
    load_checkpoint_weights,
    load_train_state,
    save_checkpoint,
)


def test_metrics_log_is_cut_back_to_the_checkpoint_step_on_resume(tmp_path):
    run = RunDir(str(tmp_path))
    log = MetricsLog(run, None)
    for step in range(1, 7):
        log.add(type="step", epoch=1 + (step > 3), step=step, loss=1.0 / step)
    resumed = MetricsLog(run, 3)
    assert [x["step"] for x in resumed.kept] == [1, 2, 3]
    resumed.add(type="resume", epoch=1, step=3)
    assert [(x["type"], x["step"]) for x in run.read_metrics()] == [
        ("step", 1),
        ("step", 2),
        ("step", 3),
        ("resume", 3),
    ]


def test_completed_epochs_counts_only_checkpoints_with_their_train_state(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.completed_epochs() == 0
    for epoch in (1, 2, 3):
        (tmp_path / checkpoint_dir_name(epoch)).mkdir()
        (tmp_path / checkpoint_dir_name(epoch) / "model.safetensors").write_bytes(b"w")
    for epoch in (1, 2):  # epoch 3's upload was cut short
        (tmp_path / checkpoint_dir_name(epoch) / "train_state.pt").write_bytes(b"s")
    assert run.completed_epochs() == 2


def test_a_checkpoint_holds_the_ema_weights_beside_the_raw_ones(tmp_path):
    import torch

    raw, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(raw.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    (tmp_path / "with").mkdir()
    save_checkpoint(str(tmp_path / "with"), raw, optimizer, scheduler, 1, 4, {"weights": "ema"}, ema)
    for which, module in (("raw", raw), ("ema", ema)):
        loaded = load_checkpoint_weights(str(tmp_path / "with"), which)
        assert all(torch.equal(loaded[k], v) for k, v in module.state_dict().items())
    assert load_train_state(str(tmp_path / "with"))["metrics"] == {"weights": "ema"}
    (tmp_path / "without").mkdir()
    save_checkpoint(str(tmp_path / "without"), raw, optimizer, scheduler, 1, 4, {})
    with pytest.raises(FileNotFoundError, match="holds no EMA weights"):
        load_checkpoint_weights(str(tmp_path / "without"), "ema")


def test_the_data_fingerprint_names_each_changed_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "labels.csv").write_text("image_path,label,subset\na.png,0,train\n")
    (tmp_path / "backbone.safetensors").write_bytes(b"weights")
    run = RunDir(str(tmp_path / "run"))
    storage.makedirs(run.path)
    before = data_fingerprint(str(root), str(tmp_path / "backbone.safetensors"))
    assert before["class_to_idx.json"] is None and before["pretrained"] != "hub:"
    run.write_fingerprint(before)
    run.check_fingerprint(before)  # unchanged: fine
    (root / "class_to_idx.json").write_text('{"a": 0}')
    (tmp_path / "backbone.safetensors").write_bytes(b"other weights")
    with pytest.raises(ConfigError, match="trained on other data") as e:
        run.check_fingerprint(data_fingerprint(str(root), str(tmp_path / "backbone.safetensors")))
    assert "class_to_idx.json: absent -> " in str(e.value) and "pretrained: " in str(e.value)
    assert "labels.csv" not in str(e.value)
    assert data_fingerprint(str(root), "vit_tiny_patch16_224.augreg_in21k")["pretrained"].startswith("hub:")


def test_skipped_rows_defuse_formula_cells_and_keep_the_rest(tmp_path):
    run = RunDir(str(tmp_path))
    problems = [
        Problem("labels.csv", 9, "cannot read it", "missing_file", path="@SUM(A1).png"),
        Problem("labels.csv", 3, "cannot decode", "undecodable", path="images/ok.png"),
        Problem("labels.csv", 5, "cannot read it", "missing_file", path="-2+3.png"),
    ]
    rows = list(csv.DictReader(io.StringIO(Path(run.write_skipped(problems)).read_text())))
    assert [(r["line"], r["image_path"]) for r in rows] == [
        ("3", "images/ok.png"),
        ("5", "'-2+3.png"),
        ("9", "'@SUM(A1).png"),
    ]
    assert rows[0]["reason"] == "undecodable: cannot decode"


def test_every_file_round_trips_on_s3(s3, tmp_path):
    cfg = TrainConfig(data_root=str(tmp_path), storage_path=s3.uri("rundir"), run_name="r")
    run = RunDir.of(cfg)
    run.write_config(cfg)
    run.write_summary({"completed": True, "epochs": 3})
    run.write_mlflow({"run_id": "abc"})
    run.write_workers([{"rank": 0}])
    MetricsLog(run, None).add(type="step", epoch=1, step=1, loss=0.5)
    assert run.exists() and run.read_config()["run_name"] == "r"
    assert run.read_summary() == {"completed": True, "epochs": 3} and run.read_mlflow() == {"run_id": "abc"}
    assert run.read_workers() == [{"rank": 0}] and run.read_metrics()[0]["loss"] == 0.5
    assert json.loads(storage.read_text(run.file("summary.json")))["epochs"] == 3
    assert RunDir(s3.uri("rundir", "nothing")).read_summary() is None
