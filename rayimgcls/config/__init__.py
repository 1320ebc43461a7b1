"""Typed configuration for every stage, loaded from a YAML file and/or flags and validated before Ray starts.

Each stage has one dataclass (train.py, infer.py, serve.py); its fields are the YAML keys, and the CLI turns each
field into a flag (`num_epochs` -> `--num-epochs`), so names, defaults and help live in exactly one place.
Training keeps the SambaStudio hyperparameter names, defaults and ranges so a SambaStudio job carries over
unchanged. base.py holds what they share (checks, loading, diffs); architecture.py which timm models we build.
"""

from rayimgcls.config.architecture import model_problems
from rayimgcls.config.base import (
    PRECISIONS,
    ConfigError,
    base_type,
    check_keys,
    coerce,
    diff,
    field_default,
    field_types,
    load_config,
    to_yaml,
)
from rayimgcls.config.infer import InferConfig
from rayimgcls.config.serve import ServeConfig
from rayimgcls.config.train import TrainConfig, float_triple

__all__ = [
    "PRECISIONS",
    "ConfigError",
    "InferConfig",
    "ServeConfig",
    "TrainConfig",
    "base_type",
    "check_keys",
    "coerce",
    "diff",
    "field_default",
    "field_types",
    "float_triple",
    "load_config",
    "model_problems",
    "to_yaml",
]
