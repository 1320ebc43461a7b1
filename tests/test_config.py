"""config.py: defaults < YAML < flags, type coercion, unknown keys, and every range refused with its name,
value and allowed range."""

from __future__ import annotations

import pytest

from rayimgcls.config import ConfigError, TrainConfig, diff, load_config


def test_sambastudio_defaults():
    cfg = TrainConfig(data_root="d")
    assert (
        cfg.attention_dropout_rate,
        cfg.batch_size,
        cfg.dropout_rate,
        cfg.learning_rate,
        cfg.logging_steps,
        cfg.multilabel,
        cfg.num_epochs,
        cfg.num_intended_classes,
        cfg.weight_decay,
    ) == (0.0, 64, 0.0, 1e-4, 50, False, 3, None, 0.0)
    assert cfg.metric == "top1" and TrainConfig(data_root="d", multilabel=True).metric == "map"


def test_flags_win_over_yaml_which_wins_over_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "learning_rate: 1e-3\nnum_epochs: 7\nmultilabel: true\nmodel_kwargs: {depth: 2}\ndata_root: /data\n"
    )
    cfg = load_config(TrainConfig, str(tmp_path / "run.yaml"), {"num_epochs": 9, "batch_size": None})
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)  # YAML reads 1e-3 as a string
    assert cfg.num_epochs == 9 and cfg.batch_size == 64 and cfg.multilabel is True
    assert cfg.model_kwargs == {"depth": 2}
    flags = {"data_root": "d", "model_kwargs": '{"depth": 3}'}
    assert load_config(TrainConfig, None, flags).model_kwargs == {"depth": 3}


def test_unknown_yaml_keys_and_bad_types_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("data_root: d\nnum_epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*'num_epoch' \\(did you mean 'num_epochs'\\?\\)"):
        load_config(TrainConfig, str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("data_root: d\nbatch_size: lots\n")
    with pytest.raises(ConfigError, match="batch_size='lots': expected int"):
        load_config(TrainConfig, str(tmp_path / "b.yaml"))
    (tmp_path / "c.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("attention_dropout_rate", 1.0, "0 <= x < 1"),
        ("dropout_rate", -0.1, "0 <= x < 1"),
        ("batch_size", 0, ">= 1"),
        ("learning_rate", 0.0, "> 0"),
        ("logging_steps", 0, ">= 1"),
        ("num_epochs", 0, ">= 1"),
        ("num_intended_classes", 1001, "1..1000"),
        ("weight_decay", -1.0, ">= 0"),
        ("precision", "fp16", "auto | fp32 | bf16"),
        ("num_workers", 0, ">= 1"),
        ("run_name", "a/b", "letters"),
        ("augment", "heavy", "none | light | standard | strong"),
        ("grad_accum_steps", 0, ">= 1"),
        ("clip_grad", 0.0, "> 0"),
        ("clip_mode", "max", "norm | value"),
        ("layer_decay", 1.5, "0 < x <= 1"),
        ("crop_pct", 0.0, "0 < x <= 1"),
        ("crop_mode", "fit", "center | squash | border"),
        ("interpolation", "cubic", "bilinear | bicubic"),
        ("mean", "0.5,0.5", "three comma-separated floats"),
        ("mean", "inf,0.5,0.5", "three comma-separated floats"),
        ("std", "0.5,0,0.5", "three floats > 0"),
        ("early_stopping_patience", 0, ">= 1"),
        ("early_stopping_min_delta", -0.1, ">= 0"),
        ("label_smoothing", 1.0, "0 <= x < 1"),
        ("model_ema_decay", 0.0, "0 < x < 1"),
        ("model_ema_decay", 1.0, "0 < x < 1"),
    ],
)
def test_out_of_range_values_are_refused(field, value, allowed):
    with pytest.raises(ConfigError) as e:
        TrainConfig(data_root="d", **{field: value})
    assert f"{field}={value!r}: allowed {allowed}" in str(e.value)


def test_batch_must_divide_by_workers_and_data_root_is_required():
    with pytest.raises(ConfigError, match="batch_size=10: must divide evenly by num_workers=3"):
        TrainConfig(data_root="d", batch_size=10, num_workers=3)
    with pytest.raises(ConfigError, match="data_root: required"):
        TrainConfig()
    with pytest.raises(ConfigError, match="mixup/cutmix: not supported with multilabel"):
        TrainConfig(data_root="d", multilabel=True, mixup=0.2)


def test_diff_shows_what_changed():
    old = TrainConfig(data_root="d").__dict__
    new = TrainConfig(data_root="d", learning_rate=0.01, num_epochs=5)
    assert diff(old, new, TrainConfig.RESUMABLE_CHANGES) == ["learning_rate: 0.0001 -> 0.01"]


def test_ema_and_compile_keys_come_from_yaml_and_show_in_config_yaml(tmp_path):
    from rayimgcls.config import to_yaml

    (tmp_path / "run.yaml").write_text("data_root: d\nmodel_ema: true\nmodel_ema_decay: 0.999\ntorch_compile: true\n")
    cfg = load_config(TrainConfig, str(tmp_path / "run.yaml"), {"model_ema_warmup": "true"})
    assert (cfg.model_ema, cfg.model_ema_decay, cfg.model_ema_warmup, cfg.torch_compile) == (True, 0.999, True, True)
    shown = to_yaml(cfg)
    assert "model_ema: true\nmodel_ema_decay: 0.999\nmodel_ema_warmup: true\ntorch_compile: true\n" in shown
    # compiling changes only the rounding, so a run may resume with it switched; the EMA settings may not change
    old = TrainConfig(data_root="d").__dict__
    new = TrainConfig(data_root="d", torch_compile=True, model_ema=True)
    assert diff(old, new, TrainConfig.RESUMABLE_CHANGES) == ["model_ema: False -> True"]
