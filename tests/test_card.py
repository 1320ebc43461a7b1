"""card.py: config.json of a model directory is untrusted input (issue 10, item 6): every field checked, a model
source or file-opening kwarg refused before timm sees it, the version required."""

from __future__ import annotations

import pytest
from conftest import edited_model_dir

from rayimgcls.card import ModelError, read_card


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["model"].update(name="hf-hub:timm/vit_tiny_patch16_224"), "a model source"),
        (lambda c: c["model"].update(name="local-dir:/tmp/x"), "a model source"),
        (lambda c: c["model"].update(name="timm/vit_tiny_patch16_224"), "a model source"),
        (
            lambda c: c["model"]["kwargs"].update(pretrained_cfg_overlay={"file": "/etc/passwd"}),
            "pretrained_cfg_overlay",
        ),
        (lambda c: c["model"]["kwargs"].update(cache_dir="/tmp"), "cache_dir"),
        (lambda c: c["model"]["kwargs"].update(depth={"a": 1}), "depth={'a': 1}: expected a number"),
        (lambda c: c["preprocess"].update(crop_pct=0), r"crop_pct=0: allowed 0.25 <= x <= 1"),
        (lambda c: c["preprocess"].update(crop_pct=1e-4), r"crop_pct=0.0001: allowed 0.25 <= x <= 1"),
        (lambda c: c["preprocess"].update(crop_pct=1.5), r"crop_pct=1.5"),
        (lambda c: c["preprocess"].update(interpolation="magic"), "interpolation 'magic': allowed nearest"),
        (
            lambda c: c["preprocess"].update(interpolation=["bicubic"]),
            r'preprocess.interpolation=\["bicubic"\]: expected a string',
        ),
        (lambda c: c["preprocess"].update(crop_mode={"a": 1}), "preprocess.crop_mode=.*expected a string"),
        (
            lambda c: c["preprocess"].update(crop_mode="zoom"),
            "crop_mode 'zoom': supported are center, squash and border",
        ),
        (lambda c: c["preprocess"].update(mean=[0.5, 0.5]), r"preprocess.mean=.*three numbers in \[0, 1\]"),
        (lambda c: c["preprocess"].update(mean=[1e308, 0, 0]), r"preprocess.mean=\[1e\+308, 0, 0\]: expected three"),
        (lambda c: c["preprocess"].update(mean=[-0.1, 0, 0]), r"preprocess.mean=\[-0.1, 0, 0\]"),
        (lambda c: c["preprocess"].update(mean=[0.5, True, 0.5]), r"preprocess.mean="),
        (lambda c: c["preprocess"].update(std=[0.5, float("nan"), 0.5]), r"preprocess.std=.*in \[1e-12, 1\]"),
        (lambda c: c["preprocess"].update(std=[0.5, 1e308, 0.5]), r"preprocess.std="),
        (lambda c: c["preprocess"].update(std=[0.5, 0, 0.5]), "preprocess.std="),
        (lambda c: c["preprocess"].update(foo=1), r"preprocess.foo: unknown field \(known: input_size, "),
        (lambda c: c["preprocess"].update(input_size="224"), 'input_size="224": expected an integer'),
        (lambda c: c["preprocess"].update(max_pixels=-1), "max_pixels=-1"),
        (lambda c: c.update(thresholds=[0.5, 2.0]), "thresholds: expected numbers in"),
        (lambda c: c.update(precision="fp8"), 'precision="fp8"'),
        (lambda c: c.update(version=""), 'version "" is not the sha256'),
        (lambda c: c.pop("version"), 'version "" is not the sha256'),
    ],
)
def test_config_json_fields_are_checked(model_dir, tmp_path, edit, expected):
    with pytest.raises(ModelError, match=expected):
        read_card(edited_model_dir(model_dir, tmp_path, edit))
