"""config.py: defaults < YAML < flags, type coercion, unknown keys, and every range refused with its name,
value and allowed range."""

from __future__ import annotations

import pytest

from rayimgcls.config import ConfigError, TrainConfig, diff, load_config, to_yaml


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
        ("clip_grad", 0.0, "> 0, finite"),
        ("clip_grad", float("inf"), "> 0, finite"),
        ("clip_mode", "max", "norm | value"),
        ("layer_decay", 1.5, "0 < x <= 1"),
        ("crop_pct", 0.0, "0.25 <= x <= 1"),
        ("crop_mode", "fit", "center | squash | border"),
        ("interpolation", "cubic", "bilinear | bicubic"),
        ("mean", "0.5,0.5", "three comma-separated floats"),
        ("mean", "inf,0.5,0.5", "three comma-separated floats"),
        ("std", "0.5,0,0.5", "three comma-separated floats, 0 < x <= 1"),
        ("early_stopping_patience", 0, ">= 1"),
        ("early_stopping_min_delta", -0.1, ">= 0, finite"),
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
    # the EMA's own settings without the EMA would be accepted and do nothing
    with pytest.raises(ConfigError, match="model_ema_decay=0.999: needs model_ema"):
        TrainConfig(data_root="d", model_ema_decay=0.999)
    with pytest.raises(ConfigError, match="model_ema_warmup=True: needs model_ema"):
        TrainConfig(data_root="d", model_ema_warmup=True)


def test_yaml_values_are_typed_strictly(tmp_path):
    """Review 14: a boolean is no number (nor 0.5 a boolean), null is refused for a field that has no None, and
    YAML lists with exponents (read as strings) still give numbers."""
    for text, message in [
        ("crop_pct: true", "crop_pct=True: expected float"),
        ("grad_accum_steps: true", "grad_accum_steps=True: expected int"),
        ("hflip: true", "hflip=True: expected float"),
        ("early_stopping_patience: yes", "early_stopping_patience=True: expected int"),
        ("random_resized_crop: 0.5", "random_resized_crop=0.5: expected bool"),
        ("randaugment: true", "randaugment=True: expected str"),
        ("class_weights: null", "class_weights=None: expected str"),
        ("mean: [0.5, true, 0.5]", "mean=\\[0.5, True, 0.5\\]: allowed three comma-separated floats"),
    ]:
        (tmp_path / "r.yaml").write_text(f"data_root: d\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, str(tmp_path / "r.yaml"))
    (tmp_path / "r.yaml").write_text("data_root: d\nstd: [1e-12, 1, 1]\nmean: [0, 0.5, 1]\nmodel_ema: 1\n")
    cfg = load_config(TrainConfig, str(tmp_path / "r.yaml"))
    assert (cfg.std, cfg.mean, cfg.model_ema) == ([1e-12, 1.0, 1.0], [0.0, 0.5, 1.0], True)


def test_mean_and_std_are_three_floats_however_written(tmp_path):
    """The same mean as a YAML list and as the flag's text is the same setting (a resume compares them)."""
    (tmp_path / "r.yaml").write_text("data_root: d\nmean: [0.5, 0.5, 0.5]\n")
    from_yaml = load_config(TrainConfig, str(tmp_path / "r.yaml"))
    from_flag = load_config(TrainConfig, None, {"data_root": "d", "mean": "0.5,0.5,0.5"})
    assert from_yaml.mean == from_flag.mean == [0.5, 0.5, 0.5]
    assert diff(from_yaml.__dict__, from_flag) == []
    assert "mean:\n- 0.5\n- 0.5\n- 0.5\n" in to_yaml(from_flag)
    for name, value in [("mean", "1e308,0,0"), ("mean", "-0.1,0,0"), ("std", "11,1,1"), ("std", "nan,1,1")]:
        with pytest.raises(ConfigError, match=f"{name}='{value}': allowed three comma-separated floats"):
            TrainConfig(data_root="d", **{name: value})


def test_a_key_missing_from_an_old_config_yaml_counts_as_its_default():
    old = {k: v for k, v in TrainConfig(data_root="d").__dict__.items() if not k.startswith("model_ema")}
    assert diff(old, TrainConfig(data_root="d")) == []
    assert diff(old, TrainConfig(data_root="d", model_ema=True)) == ["model_ema: None -> True"]


@pytest.mark.parametrize(
    "spec,ok",
    [("rand-m9-mstd0.5-inc1", True), ("rand-m9-n3-p0.5-mmax10-tweights", True), ("rand", True)]
    + [("5", False), ("rand-xyz", False), ("rand-m", False), ("rand-m9.5", False), ("auto-m9", False)],
)
def test_randaugment_spec_is_parsed_before_ray(spec, ok):
    if ok:
        assert TrainConfig(data_root="d", randaugment=spec).randaugment == spec
    else:
        with pytest.raises(ConfigError, match=f"randaugment='{spec}': allowed rand-<sections>"):
            TrainConfig(data_root="d", randaugment=spec)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"multilabel": True, "label_smoothing": 0.1}, "label_smoothing=0.1: not with multilabel"),
        ({"clip_mode": "value"}, "clip_mode='value': needs clip_grad"),
        ({"early_stopping_min_delta": 0.01}, "early_stopping_min_delta=0.01: needs early_stopping_patience"),
        (
            {"random_resized_crop": False, "crop_scale_min": 0.3},
            "crop_scale_min=0.3: needs random_resized_crop \\(it is off: --no-random-resized-crop\\)",
        ),
        ({"augment": "none", "crop_scale_min": 0.3}, "crop_scale_min=0.3: .*it is off: --augment none"),
        ({"class_weights": ""}, "class_weights='': allowed none \\| auto \\| a JSON file"),
        ({"class_weights": "AUTO"}, "class_weights='AUTO': allowed none \\| auto \\| a JSON file"),
        (
            {"class_weights": "auto", "augment": "strong"},
            "class_weights='auto': not with mixup=0.8/cutmix=1.0 \\(--augment strong sets them\\)"
            ".*--mixup 0 --cutmix 0",
        ),
    ],
)
def test_knobs_that_would_do_nothing_or_contradict_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data_root="d", **kwargs)


def test_presets_leave_multilabel_without_label_smoothing_and_their_own_values_pass():
    assert TrainConfig(data_root="d", multilabel=True, augment="standard").label_smoothing == 0.0
    # config.yaml of a run (every value resolved) loads again as a configuration
    for augment in ("none", "light", "standard"):
        stored = TrainConfig(data_root="d", augment=augment, random_resized_crop=False).__dict__
        assert TrainConfig(**stored).augment == augment
