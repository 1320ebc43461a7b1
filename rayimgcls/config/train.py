"""TrainConfig: the SambaStudio hyperparameters (names, defaults and ranges unchanged), the recipe knobs and
their augmentation presets, and which settings a resume may change."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Any

from rayimgcls import storage
from rayimgcls.config.architecture import model_problems
from rayimgcls.config.base import PRECISIONS, check, field_default, opt, raise_if, safe_name
from rayimgcls.images import CROP_PCT_RANGE, MEAN_RANGE, STD_RANGE


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
        None, "Eval crop fraction, 0.25 <= x <= 1 (resize to size/crop_pct, crop); default timm's."
    )
    crop_mode: str | None = opt(
        None,
        "center (shorter side, centre crop) | squash (whole image, aspect not kept) | border (whole image, padded).",
    )
    interpolation: str | None = opt(None, "Resize filter: bilinear | bicubic | nearest | lanczos | box | hamming.")
    mean: list[float] | None = opt(
        None, "Normalisation mean, three comma-separated floats in 0..1; default the timm model's."
    )
    std: list[float] | None = opt(
        None, "Normalisation std, three comma-separated floats, 0 < x <= 1; default the timm model's."
    )
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
            check(self, "attention_dropout_rate", 0 <= self.attention_dropout_rate < 1, "0 <= x < 1"),
            check(self, "batch_size", self.batch_size >= 1, ">= 1"),
            check(self, "dropout_rate", 0 <= self.dropout_rate < 1, "0 <= x < 1"),
            check(self, "learning_rate", self.learning_rate > 0, "> 0"),
            check(self, "logging_steps", self.logging_steps >= 1, ">= 1"),
            check(self, "num_epochs", self.num_epochs >= 1, ">= 1"),
            check(
                self,
                "num_intended_classes",
                self.num_intended_classes is None or 1 <= self.num_intended_classes <= 1000,
                "1..1000",
            ),
            check(self, "weight_decay", self.weight_decay >= 0, ">= 0"),
            check(self, "image_size", 8 <= self.image_size <= 4096, "8..4096"),
            check(self, "precision", self.precision in PRECISIONS, " | ".join(PRECISIONS)),
            *self._resolve_augment(),
            check(self, "grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            check(self, "clip_grad", self.clip_grad is None or 0 < self.clip_grad < math.inf, "> 0, finite"),
            check(self, "layer_decay", self.layer_decay is None or 0 < self.layer_decay <= 1, "0 < x <= 1"),
            check(self, "clip_mode", self.clip_mode in CLIP_MODES, " | ".join(CLIP_MODES)),
            check(self, "model_ema_decay", 0 < self.model_ema_decay < 1, "0 < x < 1"),
            check(
                self,
                "crop_pct",
                self.crop_pct is None or CROP_PCT_RANGE[0] <= self.crop_pct <= CROP_PCT_RANGE[1],
                f"{CROP_PCT_RANGE[0]:g} <= x <= {CROP_PCT_RANGE[1]:g}",
            ),
            check(self, "crop_mode", self.crop_mode in (None, *CROP_MODES), " | ".join(CROP_MODES)),
            check(self, "interpolation", self.interpolation in (None, *INTERPOLATIONS), " | ".join(INTERPOLATIONS)),
            *self._normalise_mean_std(),
            check(self, "num_workers", self.num_workers >= 1, ">= 1"),
            check(self, "cpus_per_worker", self.cpus_per_worker is None or self.cpus_per_worker > 0, "> 0"),
            check(self, "torch_threads", self.torch_threads is None or self.torch_threads >= 1, ">= 1"),
            check(self, "num_to_keep", self.num_to_keep >= 1, ">= 1"),
            check(
                self,
                "checkpoint_metric",
                self.checkpoint_metric in (None, *CHECKPOINT_METRICS),
                " | ".join(CHECKPOINT_METRICS),
            ),
            check(
                self,
                "early_stopping_patience",
                self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                ">= 1",
            ),
            check(self, "early_stopping_min_delta", 0 <= self.early_stopping_min_delta < math.inf, ">= 0, finite"),
            check(self, "max_failures", self.max_failures >= -1, ">= 0, or -1 for unlimited"),
            check(
                self,
                "run_name",
                self.run_name is None or safe_name(self.run_name),
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
        errors += self._knob_problems()
        if self.multilabel and (self.mixup or self.cutmix):
            errors.append("mixup/cutmix: not supported with multilabel (they mix single-class targets)")
        errors += model_problems(self.model, self.model_kwargs)
        raise_if(errors, "training")

    def _resolve_augment(self) -> list[str | None]:
        """Fill the augmentation fields not given from the preset (the stored config.yaml shows every value)."""
        if self.augment is None:
            self.augment = "standard" if self.pretrained else "light"
        if self.augment not in AUGMENT_PRESETS:
            return [check(self, "augment", False, " | ".join(AUGMENT_PRESETS))]
        preset = AUGMENT_PRESETS[self.augment]
        if self.multilabel:  # MixUp/CutMix mix single-class targets, and BCE has no label smoothing
            preset = {**preset, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0}
        # a crop scale given while the crop is off does nothing; the preset's own value is no choice of the user's
        scale_given = self.crop_scale_min not in (None, preset["crop_scale_min"])
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.randaugment = self.randaugment or None
        return [
            check(self, "crop_scale_min", 0 < self.crop_scale_min <= 1, "0 < x <= 1"),
            check(self, "hflip", 0 <= self.hflip <= 1, "0..1"),
            check(self, "vflip", 0 <= self.vflip <= 1, "0..1"),
            check(self, "color_jitter", self.color_jitter >= 0, ">= 0"),
            check(self, "mixup", self.mixup >= 0, ">= 0"),
            check(self, "cutmix", self.cutmix >= 0, ">= 0"),
            check(self, "label_smoothing", 0 <= self.label_smoothing < 1, "0 <= x < 1"),
            check(self, "randaugment", self.randaugment is None or randaugment_ok(self.randaugment), RANDAUGMENT_SPEC),
            self._crop_scale_unused() if scale_given and not self.random_resized_crop else None,
        ]

    def _crop_scale_unused(self) -> str:
        off = "--no-random-resized-crop" if self._preset("random_resized_crop") else f"--augment {self.augment}"
        return f"crop_scale_min={self.crop_scale_min!r}: needs random_resized_crop (it is off: {off})"

    def _normalise_mean_std(self) -> list[str | None]:
        """mean/std as a list of three floats, however given (a YAML list, '0.5,0.5,0.5'), so that config.yaml
        and a resume compare them as numbers."""
        errors = []
        for name, (low, high), allowed in (  # the ranges a model directory's config.json is held to (card.py)
            ("mean", MEAN_RANGE, f"{MEAN_RANGE[0]:g} <= x <= {MEAN_RANGE[1]:g}"),
            ("std", STD_RANGE, f"0 < x <= {STD_RANGE[1]:g}"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            triple = float_triple(value)
            if triple is None or not all(low <= v <= high for v in triple) or (name == "std" and 0.0 in triple):
                errors.append(check(self, name, False, f"three comma-separated floats, {allowed}"))
            else:
                setattr(self, name, triple)
        return errors

    def _preset(self, name: str) -> Any:
        return AUGMENT_PRESETS.get(self.augment or "", {}).get(name)

    def _knob_problems(self) -> list[str]:
        """Settings that contradict each other, or that would be accepted and do nothing."""
        errors = []
        if self.class_weights in ("", None) or (
            self.class_weights.lower() in ("none", "auto") and self.class_weights not in ("none", "auto")
        ):
            errors.append(f"class_weights={self.class_weights!r}: allowed none | auto | a JSON file")
        elif self.class_weights != "none" and (self.mixup or self.cutmix):
            preset = f" (--augment {self.augment} sets them)" if self._preset("mixup") else ""
            errors.append(
                f"class_weights={self.class_weights!r}: not with mixup={self.mixup!r}/cutmix={self.cutmix!r}{preset}:"
                " their soft targets have no class to weight; give --mixup 0 --cutmix 0, or --class-weights none"
            )
        if self.multilabel and self.label_smoothing:
            errors.append(f"label_smoothing={self.label_smoothing!r}: not with multilabel (BCE has no smoothing)")
        if self.clip_mode == "value" and self.clip_grad is None:
            errors.append(f"clip_mode={self.clip_mode!r}: needs clip_grad (the value to clip at)")
        if self.early_stopping_min_delta and self.early_stopping_patience is None:
            errors.append(f"early_stopping_min_delta={self.early_stopping_min_delta!r}: needs early_stopping_patience")
        ema_default = next(field_default(f) for f in dataclasses.fields(self) if f.name == "model_ema_decay")
        if not self.model_ema and (self.model_ema_decay != ema_default or self.model_ema_warmup):
            given = "model_ema_warmup=True" if self.model_ema_warmup else f"model_ema_decay={self.model_ema_decay!r}"
            errors.append(f"{given}: needs model_ema (without it no average is kept)")
        return errors

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


def float_triple(value: Any) -> list[float] | None:
    """'0.5,0.5,0.5', '[0.5, 0.5, 0.5]' or a YAML list (whose 1e-12 YAML reads as a string) -> three finite
    floats, else None. Booleans are no numbers."""
    items = value.strip("[]() ").split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or len(items) != 3 or any(isinstance(v, bool) for v in items):
        return None
    try:
        floats = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    return floats if all(math.isfinite(v) for v in floats) else None


# timm's RandAugment sections (timm.data.auto_augment.rand_augment_transform); timm skips one it cannot parse
# ('rand-xyz' runs as the default) and fails only on the workers, so the spec is checked here.
RANDAUGMENT_SPEC = "rand-<sections>, each m<int> n<int> mmax<int> inc0|inc1 mstd<float> p<float> or t<transforms>"
_RANDAUGMENT_SECTION = re.compile(r"(m|n|mmax)\d+|inc[01]|(mstd|p)\d+(\.\d*)?|t\w+")


def randaugment_ok(spec: str) -> bool:
    sections = spec.split("-")
    return sections[0] == "rand" and all(_RANDAUGMENT_SECTION.fullmatch(c) for c in sections[1:])


CHECKPOINT_METRICS = ("top1", "top5", "macro_f1", "map", "micro_f1", "macro_f1_ml", "val_loss")
