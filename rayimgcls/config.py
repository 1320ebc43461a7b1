"""Typed configuration for every stage, loaded from a YAML file and/or flags and validated before Ray starts.

Each stage has one dataclass; its fields are the YAML keys, and the CLI turns each field into a flag
(`num_epochs` -> `--num-epochs`), so names, defaults and help live in exactly one place. Training keeps the
SambaStudio hyperparameter names, defaults and ranges so a SambaStudio job carries over unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from rayimgcls import storage


class ConfigError(ValueError):
    """Invalid configuration; the message names each field, its value and what is allowed."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with the help text its CLI flag shows."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


PRECISIONS = ("auto", "fp32", "bf16")
SERVE_LAYOUTS = ("fused", "split")

# The timm.create_model kwargs that rebuild an architecture: sizes, depths, widths, dropout and pooling. A
# model directory's config.json is untrusted input and passes its kwargs to timm, so nothing else is taken:
# no `checkpoint_path` (timm torch.load-s it before our sha256 check of the weights), no pretrained_cfg(_overlay)
# (URLs and files), no cache_dir, no in_chans (our images have three channels). Training accepts the same list
# for --model-kwargs, so it never writes a directory that cannot be loaded.
ARCHITECTURE_KWARGS = frozenset(
    {
        "num_classes", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
        "qk_norm", "init_values", "class_token", "no_embed_class", "reg_tokens", "pre_norm", "fc_norm",
        "dynamic_img_size", "dynamic_img_pad", "global_pool", "drop_rate", "pos_drop_rate", "patch_drop_rate",
        "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_block_rate", "window_size", "depths",
        "dims", "embed_dims", "output_stride", "layers", "stem_width", "stem_type", "channel_multiplier",
        "depth_multiplier", "act_layer", "norm_layer", "head_hidden_size", "conv_mlp", "ls_init_value",
        "head_norm_first", "kernel_sizes", "mlp_ratios", "sr_ratios", "use_abs_pos_emb", "use_rel_pos_bias",
    }
)  # fmt: skip
MODEL_SOURCES = ("hf-hub:", "local-dir:", "timm/")  # timm would fetch or open these, not build an architecture


def model_problems(name: object, kwargs: object) -> list[str]:
    """Why a timm model name + kwargs is not a plain architecture we build without opening anything; [] if
    it is. Values must be numbers, booleans, short names or lists of numbers: no mapping, no path."""
    problems = []
    if not isinstance(name, str) or not name:
        return [f"model name {name!r}: expected a timm model name"]
    if name.startswith(MODEL_SOURCES) or ":" in name or "/" in name:
        problems.append(f"model {name!r}: a model source ({', '.join(MODEL_SOURCES)}), not an architecture name")
    if not isinstance(kwargs, dict):
        return [*problems, f"model kwargs {kwargs!r}: expected a mapping of timm.create_model kwargs"]
    for key, value in kwargs.items():
        if key not in ARCHITECTURE_KWARGS:
            close = difflib.get_close_matches(str(key), ARCHITECTURE_KWARGS, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"model kwarg {key!r}{hint}: not an architecture setting we accept")
        elif not _plain_value(value):
            problems.append(f"model kwarg {key}={_shown(value)}: expected a number, boolean, name or list of numbers")
    return problems


def _plain_value(value: object) -> bool:
    if value is None or isinstance(value, bool | int | float):
        return True
    if isinstance(value, str):
        return len(value) <= 64 and value.replace("_", "").replace("-", "").replace(".", "").isalnum()
    if isinstance(value, list | tuple):
        return len(value) <= 64 and all(isinstance(v, bool | int | float) for v in value)
    return False


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class TrainConfig:
    data_root: str = opt("", "Dataset root holding labels.csv (local path or s3://... URI).")
    # --- SambaStudio hyperparameters: same names, defaults and ranges ---
    attention_dropout_rate: float = opt(0.0, "Attention dropout, 0 <= x < 1.")
    batch_size: int = opt(64, "Global batch size across workers; must divide by num_workers.")
    dropout_rate: float = opt(0.0, "Dropout before the classifier, 0 <= x < 1.")
    learning_rate: float = opt(1e-4, "Maximum learning rate of the OneCycle schedule, > 0.")
    logging_steps: int = opt(50, "Log loss, lr and images/s every N optimizer steps.")
    multilabel: bool = opt(False, "Several space-separated labels per image (sigmoid + BCE).")
    num_epochs: int = opt(3, "Passes over the train subset, >= 1.")
    num_intended_classes: int | None = opt(
        None, "Number of classes, 1..1000; default: class_to_idx.json, else the largest label + 1."
    )
    weight_decay: float = opt(0.0, "AdamW weight decay, >= 0.")
    # --- model ---
    model: str = opt("vit_base_patch16_224", "Any timm model name.")
    model_kwargs: dict = opt({}, 'Extra timm.create_model kwargs as JSON, e.g. \'{"patch_size": 4, "depth": 3}\'.')
    image_size: int = opt(224, "Square input size in pixels.")
    pretrained: str | None = opt(None, "Local weights (.safetensors, or a .pth/.bin state dict) or a timm hub name.")
    precision: str = opt("auto", "auto (bf16 where the hardware runs it faster), fp32 or bf16.")
    class_weights: str = opt(
        "none", "none | auto (inverse class frequency of the train rows; pos_weight for multi-label) | a JSON file."
    )
    # --- optimisation ---
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step; batch_size stays the effective global batch.")
    clip_grad: float | None = opt(None, "Clip gradients at this value, > 0 (default: no clipping).")
    layer_decay: float | None = opt(
        None, "Layer-wise LR decay for ViT fine-tuning, 0 < x <= 1: block i of n gets lr x decay^(n - i) (timm)."
    )
    clip_mode: str = opt("norm", "norm (total L2 norm of all gradients) | value (each element).")
    model_ema: bool = opt(
        False, "Keep an EMA of the weights (timm ModelEmaV3), scored beside them; the better of the two is kept."
    )
    model_ema_decay: float = opt(0.9998, "EMA decay per optimizer step, 0 < x < 1 (with --model-ema).")
    model_ema_warmup: bool = opt(
        False, "EMA decay warm-up (timm): 1 - (1 + step)^-2/3 until it reaches model_ema_decay (with --model-ema)."
    )
    torch_compile: bool = opt(
        False, "torch.compile the model on each worker (its first step compiles: ~1 min on 2 CPU cores)."
    )
    # --- augmentation: a preset, and each field below overrides it when given (None: from the preset) ---
    augment: str | None = opt(
        None, "Augmentation preset: none | light | standard | strong; default standard with --pretrained, else light."
    )
    random_resized_crop: bool | None = opt(None, "Random resized crop (else the eval resize and crop). Preset.")
    crop_scale_min: float | None = opt(None, "Smallest area fraction a random resized crop keeps, 0 < x <= 1. Preset.")
    hflip: float | None = opt(None, "Horizontal flip probability. Preset.")
    vflip: float | None = opt(None, "Vertical flip probability. Preset.")
    color_jitter: float | None = opt(None, "Colour jitter strength (0 disables). Preset.")
    randaugment: str | None = opt(None, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 ('' disables). Preset.")
    mixup: float | None = opt(None, "MixUp alpha (0 disables). Preset.")
    cutmix: float | None = opt(None, "CutMix alpha (0 disables). Preset.")
    label_smoothing: float | None = opt(None, "Label smoothing for multi-class cross-entropy, 0 <= x < 1. Preset.")
    # --- preprocessing (stored in the model directory: inference and Serve follow it) ---
    crop_pct: float | None = opt(
        None, "Eval crop fraction, 0 < x <= 1 (resize to size/crop_pct, crop); default timm's."
    )
    crop_mode: str | None = opt(
        None,
        "center (shorter side, centre crop) | squash (whole image, aspect not kept) | border (whole image, padded).",
    )
    interpolation: str | None = opt(None, "Resize filter: bilinear | bicubic | nearest | lanczos | box | hamming.")
    mean: str | None = opt(None, "Normalisation mean, three comma-separated floats; default the timm model's.")
    std: str | None = opt(None, "Normalisation std, three comma-separated floats > 0; default the timm model's.")
    # --- scale ---
    num_workers: int = opt(1, "Ray Train workers (one GPU each with --use-gpu).")
    use_gpu: bool = opt(False, "Give each worker a GPU.")
    cpus_per_worker: float | None = opt(None, "CPUs reserved per worker; default leaves Ray Data at least one CPU.")
    torch_threads: int | None = opt(None, "torch threads per worker; default: its CPU reservation, at least 1.")
    # --- run ---
    run_name: str | None = opt(None, "Run name; the same name and storage path resumes. Default: new timestamp.")
    storage_path: str = opt("~/ray_results", "Where runs live (local path, NFS or s3://...).")
    output_dir: str | None = opt(None, "Where the model directory goes; default <storage_path>/<run_name>/model.")
    num_to_keep: int = opt(2, "Checkpoints kept (the best by checkpoint_metric).")
    checkpoint_metric: str | None = opt(None, "Validation metric that ranks checkpoints; default top1 or map.")
    early_stopping_patience: int | None = opt(
        None, "Stop after this many epochs without the checkpoint metric improving, >= 1 (needs validation rows)."
    )
    early_stopping_min_delta: float = opt(
        0.0, "Smallest change of the checkpoint metric that counts as improving, >= 0."
    )
    max_failures: int = opt(0, "Worker failures tolerated; each restarts from the last checkpoint.")
    seed: int = opt(0, "Random seed.")
    skip_bad_rows: bool = opt(False, "Skip unreadable rows, recorded in skipped_rows.csv (default: fail).")
    # --- tracking ---
    tensorboard: bool = opt(True, "Write TensorBoard event files to <run>/tensorboard (--no-tensorboard: off).")
    mlflow_tracking_uri: str | None = opt(
        None, "Also log to this MLflow tracking server (http://host:5000); needs pip install rayimgcls[mlflow]."
    )
    mlflow_experiment: str = opt("rayimgcls", "MLflow experiment the run goes to (with --mlflow-tracking-uri).")
    register_model: str | None = opt(None, "Register the exported model under this name in MLflow's registry.")

    # Fields that may change between a run and its resumption: they do not change what is computed (torch_compile
    # changes only the rounding: its kernels add up in another order).
    RESUMABLE_CHANGES: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "num_epochs",
            "early_stopping_patience",
            "early_stopping_min_delta",
            "max_failures",
            "output_dir",
            "logging_steps",
            "run_name",
            "storage_path",
            "tensorboard",
            "mlflow_tracking_uri",
            "mlflow_experiment",
            "register_model",
            "torch_compile",
        }
    )

    def __post_init__(self) -> None:
        if not storage.is_uri(self.storage_path):
            self.storage_path = os.path.abspath(os.path.expanduser(self.storage_path))
        errors = [
            _check(self, "attention_dropout_rate", 0 <= self.attention_dropout_rate < 1, "0 <= x < 1"),
            _check(self, "batch_size", self.batch_size >= 1, ">= 1"),
            _check(self, "dropout_rate", 0 <= self.dropout_rate < 1, "0 <= x < 1"),
            _check(self, "learning_rate", self.learning_rate > 0, "> 0"),
            _check(self, "logging_steps", self.logging_steps >= 1, ">= 1"),
            _check(self, "num_epochs", self.num_epochs >= 1, ">= 1"),
            _check(
                self,
                "num_intended_classes",
                self.num_intended_classes is None or 1 <= self.num_intended_classes <= 1000,
                "1..1000",
            ),
            _check(self, "weight_decay", self.weight_decay >= 0, ">= 0"),
            _check(self, "image_size", 8 <= self.image_size <= 4096, "8..4096"),
            _check(self, "precision", self.precision in PRECISIONS, " | ".join(PRECISIONS)),
            *self._resolve_augment(),
            _check(self, "grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            _check(self, "clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0"),
            _check(self, "layer_decay", self.layer_decay is None or 0 < self.layer_decay <= 1, "0 < x <= 1"),
            _check(self, "clip_mode", self.clip_mode in CLIP_MODES, " | ".join(CLIP_MODES)),
            _check(self, "model_ema_decay", 0 < self.model_ema_decay < 1, "0 < x < 1"),
            _check(self, "crop_pct", self.crop_pct is None or 0 < self.crop_pct <= 1, "0 < x <= 1"),
            _check(self, "crop_mode", self.crop_mode in (None, *CROP_MODES), " | ".join(CROP_MODES)),
            _check(self, "interpolation", self.interpolation in (None, *INTERPOLATIONS), " | ".join(INTERPOLATIONS)),
            _check(
                self,
                "mean",
                self.mean is None or float_triple(self.mean, 0.0) is not None,
                "three comma-separated floats",
            ),
            _check(self, "std", self.std is None or float_triple(self.std, 1e-12) is not None, "three floats > 0"),
            _check(self, "num_workers", self.num_workers >= 1, ">= 1"),
            _check(self, "cpus_per_worker", self.cpus_per_worker is None or self.cpus_per_worker > 0, "> 0"),
            _check(self, "torch_threads", self.torch_threads is None or self.torch_threads >= 1, ">= 1"),
            _check(self, "num_to_keep", self.num_to_keep >= 1, ">= 1"),
            _check(
                self,
                "checkpoint_metric",
                self.checkpoint_metric in (None, *CHECKPOINT_METRICS),
                " | ".join(CHECKPOINT_METRICS),
            ),
            _check(
                self,
                "early_stopping_patience",
                self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                ">= 1",
            ),
            _check(self, "early_stopping_min_delta", self.early_stopping_min_delta >= 0, ">= 0"),
            _check(self, "max_failures", self.max_failures >= -1, ">= 0, or -1 for unlimited"),
            _check(
                self,
                "run_name",
                self.run_name is None or _safe_name(self.run_name),
                "letters, digits, '-', '_' and '.'",
            ),
        ]
        micro = self.num_workers * self.grad_accum_steps
        if self.num_workers >= 1 and self.grad_accum_steps >= 1 and self.batch_size >= 1 and self.batch_size % micro:
            errors.append(
                f"batch_size={self.batch_size}: must divide evenly by num_workers={self.num_workers}"
                + (f" x grad_accum_steps={self.grad_accum_steps}" if self.grad_accum_steps > 1 else "")
            )
        if not self.data_root:
            errors.append("data_root: required (the folder or URI holding labels.csv)")
        if self.register_model is not None and not self.mlflow_tracking_uri:
            errors.append(f"register_model={self.register_model!r}: needs mlflow_tracking_uri (the registry)")
        if self.class_weights != "none" and (self.mixup or self.cutmix):
            errors.append(f"class_weights={self.class_weights!r}: not with mixup/cutmix (their soft-target loss)")
        if self.multilabel and (self.mixup or self.cutmix):
            errors.append("mixup/cutmix: not supported with multilabel (they mix single-class targets)")
        errors += model_problems(self.model, self.model_kwargs)
        _raise_if(errors, "training")

    def _resolve_augment(self) -> list[str | None]:
        """Fill the augmentation fields not given from the preset (the stored config.yaml shows every value)."""
        if self.augment is None:
            self.augment = "standard" if self.pretrained else "light"
        if self.augment not in AUGMENT_PRESETS:
            return [_check(self, "augment", False, " | ".join(AUGMENT_PRESETS))]
        preset = AUGMENT_PRESETS[self.augment]
        if self.multilabel:  # MixUp/CutMix mix single-class targets: a preset never asks for them here
            preset = {**preset, "mixup": 0.0, "cutmix": 0.0}
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.randaugment = self.randaugment or None
        return [
            _check(self, "crop_scale_min", 0 < self.crop_scale_min <= 1, "0 < x <= 1"),
            _check(self, "hflip", 0 <= self.hflip <= 1, "0..1"),
            _check(self, "vflip", 0 <= self.vflip <= 1, "0..1"),
            _check(self, "color_jitter", self.color_jitter >= 0, ">= 0"),
            _check(self, "mixup", self.mixup >= 0, ">= 0"),
            _check(self, "cutmix", self.cutmix >= 0, ">= 0"),
            _check(self, "label_smoothing", 0 <= self.label_smoothing < 1, "0 <= x < 1"),
        ]

    @property
    def metric(self) -> str:
        """The validation metric that ranks checkpoints."""
        return self.checkpoint_metric or ("map" if self.multilabel else "top1")


# What each --augment preset sets (README: the table under Training). "none" is the eval transform alone.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {
        "random_resized_crop": False,
        "crop_scale_min": 1.0,
        "hflip": 0.0,
        "vflip": 0.0,
        "color_jitter": 0.0,
        "randaugment": None,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.0,
    },
    "light": {
        "random_resized_crop": True,
        "crop_scale_min": 0.5,
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.0,
        "randaugment": None,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.0,
    },
    "standard": {  # timm's ImageNet recipe
        "random_resized_crop": True,
        "crop_scale_min": 0.08,
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.4,
        "randaugment": None,
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.1,
    },
    "strong": {  # DeiT's: RandAugment and MixUp/CutMix on top
        "random_resized_crop": True,
        "crop_scale_min": 0.08,
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.4,
        "randaugment": "rand-m9-mstd0.5-inc1",
        "mixup": 0.8,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
    },
}
CLIP_MODES = ("norm", "value")
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def float_triple(text: str, low: float) -> tuple[float, float, float] | None:
    """'0.5,0.5,0.5' (or a YAML list, which arrives as '[0.5, 0.5, 0.5]') -> three finite floats >= low, else
    None."""
    try:
        values = tuple(float(v) for v in text.strip("[]() ").split(","))
    except ValueError:
        return None
    return values if len(values) == 3 and all(math.isfinite(v) and v >= low for v in values) else None  # type: ignore[return-value]


CHECKPOINT_METRICS = ("top1", "top5", "macro_f1", "map", "micro_f1", "macro_f1_ml", "val_loss")


@dataclass
class InferConfig:
    model_dir: str = opt("", "Model directory (model.safetensors + config.json), local or URI.")
    data_root: str = opt("", "Dataset root; image paths in the CSV are relative to it.")
    result_dir: str = opt("", "Where predictions-*.jsonl shards and manifest.json go.")
    csv: str = opt("predictions.csv", "CSV under data_root with an image_path column.")
    subset: str | None = opt(None, "Only rows of this subset (train, validation, test).")
    images: str | None = opt(
        None,
        "Predict a folder (recursively) or a glob such as 'images/**/*.jpg' "
        "instead of a CSV; relative to data_root when that is given.",
    )
    batch_size: int = opt(64, "Images per model call.")
    num_actors: int | None = opt(
        None, "Model actors; default the cluster's GPUs / gpus_per_actor with --use-gpu, else one per node."
    )
    use_gpu: bool = opt(False, "Run the model actors on GPUs (gpus_per_actor each).")
    gpus_per_actor: float | None = opt(
        None, "GPU share of each model actor with --use-gpu, 0 < x <= 1 (default 1; 0.5 packs two on a GPU)."
    )
    cpus_per_actor: float | None = opt(
        None, "CPUs each model actor reserves, the rest decode images; default 1 with --use-gpu, else 0.5."
    )
    threads_per_actor: int | None = opt(
        None, "Torch threads per model actor; default: the node's CPUs shared among its actors."
    )
    precision: str | None = opt(None, "fp32, bf16 or auto; default: the model directory's setting.")
    top_k: int = opt(5, "Classes listed in top_k (capped at the class count).")
    rows_per_shard: int = opt(10_000, "Input rows per predictions-NNNNN.jsonl shard.")
    max_pixels: int = opt(50_000_000, "Largest image in pixels (an error line beyond), checked before decoding.")
    merge: bool = opt(False, "Also write predictions.jsonl with every line.")
    overwrite: bool = opt(
        False, "Delete our earlier output in result_dir (shards, manifest, evaluation reports) first; other files stay."
    )
    resume: bool = opt(False, "Keep complete shards of the same model and input; compute the rest.")

    def __post_init__(self) -> None:
        errors = [
            _check(self, "batch_size", self.batch_size >= 1, ">= 1"),
            _check(self, "num_actors", self.num_actors is None or self.num_actors >= 1, ">= 1"),
            _check(self, "cpus_per_actor", self.cpus_per_actor is None or self.cpus_per_actor > 0, "> 0"),
            _check(self, "gpus_per_actor", self.gpus_per_actor is None or 0 < self.gpus_per_actor <= 1, "0 < x <= 1"),
            _check(self, "threads_per_actor", self.threads_per_actor is None or self.threads_per_actor >= 1, ">= 1"),
            _check(self, "precision", self.precision in (None, *PRECISIONS), " | ".join(PRECISIONS)),
            _check(self, "top_k", self.top_k >= 1, ">= 1"),
            _check(self, "rows_per_shard", self.rows_per_shard >= 1, ">= 1"),
            _check(self, "max_pixels", self.max_pixels >= 1, ">= 1"),
            _check(self, "subset", self.subset in (None, "train", "validation", "test"), "train | validation | test"),
        ]
        if self.overwrite and self.resume:
            errors.append("overwrite and resume: choose one")
        if self.images and self.subset:
            errors.append(f"subset={self.subset!r}: only with a CSV, not with images={self.images!r}")
        if self.gpus_per_actor is not None and not self.use_gpu:
            errors.append(f"gpus_per_actor={self.gpus_per_actor!r}: only with use_gpu")
        for name in ("model_dir", "result_dir"):
            if not getattr(self, name):
                errors.append(f"{name}: required")
        if not self.data_root and not self.images:
            errors.append("data_root: required (or --images DIR_OR_GLOB)")
        _raise_if(errors, "inference")
        for name in ("model_dir", "data_root", "result_dir"):  # Ray workers may run in another directory
            value = getattr(self, name)
            if value and not storage.is_uri(value):
                setattr(self, name, os.path.abspath(os.path.expanduser(value)))


@dataclass
class ServeConfig:
    model_dir: str = opt("", "Model directory (model.safetensors + config.json), local or URI.")
    host: str = opt("127.0.0.1", "Address the HTTP proxy binds; 0.0.0.0 exposes it beyond this machine.")
    port: int = opt(8000, "HTTP port.")
    route_prefix: str = opt("/", "URL prefix of the application.")
    name: str = opt("rayimgcls", "Serve application name.")
    model_name: str | None = opt(None, "Model name of the Open Inference Protocol routes; default the timm name.")
    api_key: str | None = opt(None, "Bearer token required on every route that uses the model (or RAYIMGCLS_API_KEY).")
    allow_no_key: bool = opt(False, "Allow a host beyond loopback without an API key (refused otherwise).")
    precision: str | None = opt(None, "fp32, bf16 or auto; default: the model directory's setting.")
    layout: str = opt("split", "fused: ingress and model in one deployment (no hop); split: two, scaled apart.")
    use_gpu: bool = opt(False, "Give each model replica a GPU (or a share of one: gpus_per_replica).")
    gpus_per_replica: float = opt(1.0, "GPU share of each model replica with --use-gpu, 0 < x <= 1.")
    num_cpus: float = opt(0.5, "CPUs reserved per model replica (fractional so replicas fit on small hosts).")
    ingress_num_cpus: float = opt(0.25, "CPUs reserved per ingress replica.")
    ingress_replicas: int = opt(1, "Ingress replicas (they validate and decode images).")
    ingress_max_ongoing_requests: int = opt(
        512, "Requests one ingress replica holds at once (async: slow uploads wait here, not in a model slot)."
    )
    max_concurrent_decodes: int = opt(2, "Requests one ingress replica decodes at once (each in a thread).")
    torch_threads: int | None = opt(None, "Torch threads per model replica; default max(1, floor(num_cpus)).")
    max_batch_size: int = opt(16, "Largest batch @serve.batch forms (1 turns batching off).")
    batch_wait_timeout_s: float = opt(
        0.0, "How long a batch waits to fill; 0: a batch is what queued while the last one ran (no lone request waits)."
    )
    max_concurrent_batches: int = opt(
        1, "Batches a model replica runs at once, each in a thread (2 with torch_threads=1: 2 CPU cores)."
    )
    max_ongoing_requests: int | None = opt(
        None, "Per replica; default max(2 * max_batch_size * max_concurrent_batches, 32): batches can fill."
    )
    min_replicas: int = opt(1, "Autoscaling: fewest model replicas.")
    max_replicas: int = opt(1, "Autoscaling: most model replicas.")
    target_ongoing_requests: float = opt(8.0, "Autoscaling: ongoing requests per replica to aim for.")
    upscale_delay_s: float = opt(10.0, "Autoscaling: sustained load before adding a replica.")
    downscale_delay_s: float = opt(60.0, "Autoscaling: sustained idleness before removing one.")
    look_back_period_s: float = opt(30.0, "Autoscaling: averaging window (> Serve's 10 s metrics interval).")
    max_body_bytes: int = opt(20 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    max_pixels: int = opt(50_000_000, "Largest image in pixels (422 beyond), checked before decoding.")
    max_request_pixels: int = opt(64_000_000, "Most pixels summed over a request's images (413 beyond).")
    max_images: int = opt(64, "Most images in one request.")
    max_buffered_bytes: int = opt(512 * 1024 * 1024, "Request bodies one ingress replica holds at once (503 beyond).")
    body_idle_timeout_s: float = opt(15.0, "A request body that sends nothing for this long gets 408.")
    body_timeout_s: float = opt(300.0, "Longest a request body may take to arrive (20 MB at 0.5 Mbit/s); 408 beyond.")

    def __post_init__(self) -> None:
        errors = [
            _check(self, "port", 1 <= self.port <= 65535, "1..65535"),
            _check(self, "layout", self.layout in SERVE_LAYOUTS, " | ".join(SERVE_LAYOUTS)),
            _check(self, "gpus_per_replica", 0 < self.gpus_per_replica <= 1, "0 < x <= 1"),
            _check(self, "api_key", self.api_key is None or len(self.api_key) > 0, "a non-empty string"),
            _check(self, "precision", self.precision in (None, *PRECISIONS), " | ".join(PRECISIONS)),
            _check(self, "num_cpus", self.num_cpus >= 0, ">= 0"),
            _check(self, "ingress_num_cpus", self.ingress_num_cpus >= 0, ">= 0"),
            _check(self, "ingress_replicas", self.ingress_replicas >= 1, ">= 1"),
            _check(self, "ingress_max_ongoing_requests", self.ingress_max_ongoing_requests >= 1, ">= 1"),
            _check(self, "max_concurrent_decodes", self.max_concurrent_decodes >= 1, ">= 1"),
            _check(self, "torch_threads", self.torch_threads is None or self.torch_threads >= 1, ">= 1"),
            _check(self, "max_batch_size", self.max_batch_size >= 1, ">= 1"),
            _check(self, "batch_wait_timeout_s", self.batch_wait_timeout_s >= 0, ">= 0"),
            _check(self, "max_concurrent_batches", self.max_concurrent_batches >= 1, ">= 1"),
            _check(
                self,
                "max_ongoing_requests",
                self.max_ongoing_requests is None
                or self.max_ongoing_requests >= self.max_batch_size * self.max_concurrent_batches,
                ">= max_batch_size * max_concurrent_batches (or batches cannot fill)",
            ),
            _check(self, "min_replicas", self.min_replicas >= 0, ">= 0"),
            _check(self, "max_replicas", self.max_replicas >= max(1, self.min_replicas), ">= max(1, min_replicas)"),
            _check(self, "target_ongoing_requests", self.target_ongoing_requests > 0, "> 0"),
            _check(self, "upscale_delay_s", self.upscale_delay_s >= 0, ">= 0"),
            _check(self, "downscale_delay_s", self.downscale_delay_s >= 0, ">= 0"),
            _check(self, "look_back_period_s", self.look_back_period_s > 0, "> 0"),
            _check(self, "max_body_bytes", self.max_body_bytes >= 1, ">= 1"),
            _check(self, "max_pixels", self.max_pixels >= 1, ">= 1"),
            _check(self, "max_images", self.max_images >= 1, ">= 1"),
            _check(self, "max_request_pixels", self.max_request_pixels >= self.max_pixels, ">= max_pixels"),
            _check(self, "max_buffered_bytes", self.max_buffered_bytes >= self.max_body_bytes, ">= max_body_bytes"),
            _check(self, "body_idle_timeout_s", self.body_idle_timeout_s > 0, "> 0"),
            _check(self, "body_timeout_s", self.body_timeout_s >= self.body_idle_timeout_s, ">= body_idle_timeout_s"),
        ]
        if not self.model_dir:
            errors.append("model_dir: required")
        _raise_if(errors, "serving")

    @property
    def ongoing_requests_limit(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch_size * self.max_concurrent_batches, 32)


def _check(cfg: Any, name: str, ok: bool, allowed: str) -> str | None:
    return None if ok else f"{name}={getattr(cfg, name)!r}: allowed {allowed}"


def _raise_if(errors: list[str | None], stage: str) -> None:
    errors = [e for e in errors if e]
    if errors:
        raise ConfigError(f"invalid {stage} configuration:\n  " + "\n  ".join(errors))


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


# ---------------------------------------------------------------------------------------------------------
# Loading: defaults < YAML file < flags.


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (the module uses `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def base_type(tp: Any) -> Any:
    """`int | None` -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML or flag value to the field's type (YAML reads 1e-4 as a string, flags give JSON)."""
    tp = base_type(field_types(cls)[name])
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{name}={value!r}: expected {getattr(tp, '__name__', tp)}") from None


def check_keys(cls: type, keys: typing.Iterable[str], source: str) -> None:
    """Refuse keys that are not fields of `cls`, naming the closest field (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in keys if k not in names]
    if unknown:
        close = {k: difflib.get_close_matches(k, names, 1) for k in unknown}
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in close.items()]
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}")


def load_config(cls: type, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Build a `cls` from defaults, then the YAML file, then the flags the user actually gave (not None)."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            loaded = yaml.safe_load(storage.read_text(config_file)) or {}
        except (OSError, FileNotFoundError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of names to values")
        check_keys(cls, loaded, config_file)
        values.update({k: coerce(cls, k, v) for k, v in loaded.items()})
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = coerce(cls, k, v)
    return cls(**values)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def diff(old: dict[str, Any], new: Any, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Readable differences between a stored configuration and a new one."""
    new_d = dataclasses.asdict(new)
    return [f"{k}: {old.get(k)!r} -> {new_d[k]!r}" for k in new_d if k not in ignore and old.get(k) != new_d[k]]
