"""Build a timm model; save and load the model directory; `Predictor`, the one inference class.

The model directory is the single artifact that batch inference, Serve and the Python API read:

    model/
    ├── model.safetensors   weights only: loading never unpickles anything
    └── config.json         everything needed to rebuild the model and its preprocessing (rayimgcls.card)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from rayimgcls import storage
from rayimgcls.card import CONFIG_FILE, WEIGHTS_FILE, ModelCard, ModelError, format_prediction, read_card
from rayimgcls.config import model_problems
from rayimgcls.images import PreprocessConfig, normalize, preprocess, to_chw_uint8

logger = logging.getLogger(__name__)

# Keyword arguments not every timm architecture takes (CNNs have no img_size or attention dropout).
_OPTIONAL_KWARGS = ("img_size", "attn_drop_rate", "drop_rate")


def check_model_name(name: str) -> None:
    """Refuse an unknown timm model name, suggesting close ones (before anything is started)."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ModelError(f"model={name!r}: not a timm model{hint}")


def create_model(
    name: str,
    num_classes: int,
    image_size: int | None = None,
    *,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    model_kwargs: dict | None = None,
) -> tuple[torch.nn.Module, dict]:
    """A randomly initialised timm model and the exact kwargs that rebuild it (stored in config.json)."""
    import timm

    kwargs: dict[str, Any] = {**(model_kwargs or {}), "num_classes": num_classes}
    if problems := model_problems(name, kwargs):  # nothing but an architecture reaches timm
        raise ModelError("; ".join(problems))
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    if dropout_rate:
        kwargs["drop_rate"] = dropout_rate
    if attention_dropout_rate:
        kwargs["attn_drop_rate"] = attention_dropout_rate
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kwargs), kwargs
        except TypeError as e:
            dropped = next((k for k in _OPTIONAL_KWARGS if k in kwargs and k in str(e)), None)
            if dropped is None:
                raise ModelError(f"timm.create_model({name!r}, **{kwargs}) failed: {e}") from None
            logger.info("%s takes no %s; building it without", name, dropped)
            kwargs.pop(dropped)
        except RuntimeError as e:
            raise ModelError(f"timm.create_model({name!r}) failed: {e}") from None


def library_versions() -> dict[str, str]:
    import ray
    import timm

    from rayimgcls import __version__

    return {"rayimgcls": __version__, "torch": torch.__version__, "timm": timm.__version__, "ray": ray.__version__}


def save_model_dir(model: torch.nn.Module, card: ModelCard, out_dir: str | os.PathLike) -> ModelCard:
    """Write model.safetensors and config.json (local or URI). Returns the card with its version set."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    weights = save(state)
    card.version = hashlib.sha256(weights).hexdigest()
    card.versions = card.versions or library_versions()
    storage.makedirs(out_dir)
    storage.write_bytes(storage.join(out_dir, WEIGHTS_FILE), weights)
    storage.write_text(storage.join(out_dir, CONFIG_FILE), card.to_json())
    return card


def check_model_dir(model_dir: str | os.PathLike) -> ModelCard:
    """The card of a model directory whose weights file exists: what a driver checks before it starts
    workers that would each fail to load it."""
    card = read_card(model_dir)
    weights = storage.join(model_dir, WEIGHTS_FILE)
    if not storage.exists(weights):
        raise ModelError(f"{model_dir}: {WEIGHTS_FILE} not found")
    check_weights_fit(weights, card)
    return card


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on its JSON header


def check_weights_fit(weights: str, card: ModelCard) -> None:
    """Compare the tensor names and shapes in the safetensors header (read alone: the first 8 + n bytes)
    with the model config.json describes, built on the meta device (no memory, no weights): a head of 4
    classes under a card of 5 is refused here, not in every worker that loads it."""
    head = storage.read_range(weights, 0, 8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= MAX_HEADER_BYTES:
        raise ModelError(f"{weights}: not a safetensors file")
    try:
        header = json.loads(storage.read_range(weights, 8, size))
        found = {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ModelError(f"{weights}: not a safetensors file (its header is not readable)") from None
    with torch.device("meta"):
        model, _ = create_model(card.model_name, num_classes=card.num_classes, model_kwargs=card.model_kwargs)
    wanted = {k: list(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k} missing" for k in wanted if k not in found]
    problems += [f"{k} unexpected" for k in found if k not in wanted]
    problems += [f"{k} is {found[k]}, the model needs {v}" for k, v in wanted.items() if k in found and found[k] != v]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelError(
            f"{weights} does not fit {CONFIG_FILE} ({card.model_name}, num_classes={card.num_classes}): "
            + "; ".join(problems[:3])
            + more
        )


def load_model_dir(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the model from config.json and load model.safetensors (checked against the card's sha256)."""
    from safetensors.torch import load

    card = check_model_dir(model_dir)
    weights_path = storage.join(model_dir, WEIGHTS_FILE)
    weights = storage.read_bytes(weights_path)
    if card.version and hashlib.sha256(weights).hexdigest() != card.version:
        raise ModelError(f"{weights_path} does not match the version in {CONFIG_FILE} (changed or corrupt)")
    model, _ = create_model(card.model_name, num_classes=card.num_classes, model_kwargs=card.model_kwargs)
    try:
        model.load_state_dict(load(weights), strict=True)
    except RuntimeError as e:  # shapes or names that do not match config.json (check_weights_fit says which)
        raise ModelError(f"{weights_path} does not fit {CONFIG_FILE}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), card


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict: safetensors, or a torch file loaded with weights_only=True."""
    if not os.path.exists(path):
        raise ModelError(f"pretrained weights {path!r} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corrupt file ends up here
        raise ModelError(f"{path}: not a weights-only torch file ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "model_state"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------------------
# Inference


def bf16_is_native(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of this compute capability has bf16 tensor cores (Ampere, 8.0, and later).
    `torch.cuda.is_bf16_supported()` also says True on a V100 or T4 (7.x), where bf16 is emulated and runs
    slower than fp32: its default `including_emulation=True` only checks that a bf16 tensor can be made."""
    return capability[0] >= 8


def resolve_precision(
    precision: str, device: torch.device, model: torch.nn.Module | None = None, input_size: int = 224
) -> str:
    """'auto' -> 'bf16' where the hardware runs this model faster in bf16 (and agrees), else 'fp32'.

    On CUDA that is a GPU with native bf16 (`bf16_is_native`). On a CPU it is measured: forward passes of a
    small batch in both precisions, alternating, bf16 chosen only if the best of three is >= 1.2x faster with
    probabilities within 0.02. Best of three and alternating because one timing on a shared machine is
    noise: the same pass took from 0.6 s to 5.6 s on a loaded 2-core host, which made a single comparison a
    coin flip (vit_small_patch16_224 runs 1.3-1.6x faster in bf16 there, probabilities within 0.0013).
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if bf16_is_native(torch.cuda.get_device_capability(device)) else "fp32"
    if model is None:
        return "fp32"
    x = torch.randn(4, 3, input_size, input_size)

    def run(bf16: bool) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            out = model(x).float().softmax(-1)
            return time.perf_counter() - start, out

    run(False), run(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    probs: dict[bool, torch.Tensor] = {}
    for _ in range(3):
        for bf16 in (False, True):
            seconds, probs[bf16] = run(bf16)
            times[bf16].append(seconds)
    agree = float((probs[False] - probs[True]).abs().max()) <= 0.02
    return "bf16" if agree and min(times[False]) / min(times[True]) >= 1.2 else "fp32"


def use_ieee_fp32() -> None:
    """TF32 off for CUDA matmuls and cuDNN convolutions, process-wide: what precision 'fp32' means on a GPU.

    PyTorch's defaults differ per op: matmuls are IEEE fp32, but cuDNN convolutions (ViT's patch embedding)
    run in TF32 (10-bit mantissa), which moved GPU probabilities ~1e-3 away from the CPU's. 'fp32' is the
    exact setting (parity with the CPU to 1e-5); 'auto'/'bf16' is the fast one on every GPU with TF32, since
    bf16 and TF32 arrived together (Ampere). Only the new `fp32_precision` API is used where torch has it:
    mixing it with the legacy `allow_tf32` flags makes torch raise when either is read.
    """
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def resolve_device(device: str | None) -> torch.device:
    """The device to run on: as given, else CUDA when there is one. A CUDA device this process cannot see is
    refused here, with the reason, rather than by torch deep inside loading the weights."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ModelError(
            f"device {device!r}: no CUDA device is visible (torch {torch.__version__}, {built}"
            + (f", CUDA_VISIBLE_DEVICES={seen!r}" if seen is not None else "")
            + "); use device='cpu', or give the process a GPU"
        )
    return dev


ImageInput = Image.Image | bytes | str | os.PathLike | np.ndarray


class Predictor:
    """Probabilities and top-k names for images, from a model directory.

    The same class backs the Python API, the Ray Data actors of batch inference and the Serve model
    replicas: `preprocess` (bytes -> uint8 CHW) may run elsewhere (Ray Data tasks, the Serve ingress), and
    `predict_batch` runs the model on a uint8 batch.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: torch.device, precision: str) -> None:
        self.model, self.card, self.device = model, card, device
        self.precision = resolve_precision(precision, device, model, card.preprocess.input_size)
        if device.type == "cuda" and self.precision == "fp32":
            use_ieee_fp32()
        self.max_batch: int | None = None  # learnt from an out-of-memory error, see _forward

    @classmethod
    def from_dir(
        cls, model_dir: str | os.PathLike, device: str | None = None, precision: str | None = None
    ) -> Predictor:
        dev = resolve_device(device)
        model, card = load_model_dir(model_dir, dev)
        return cls(model, card, dev, precision or card.precision)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image (bytes, path, PIL image or HWC uint8 array) -> uint8 (3, S, S)."""
        if isinstance(image, str | os.PathLike):
            image = Path(image).read_bytes()
        if isinstance(image, bytes):
            return preprocess(image, self.card.preprocess)
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else ImageOps.exif_transpose(image)
        return to_chw_uint8(image, self.card.preprocess)

    @torch.inference_mode()
    def predict_batch(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, S, S) -> probabilities (N, classes), float32: softmax, or sigmoid for multi-label."""
        # uint8 crosses to the device (4x fewer bytes than float); normalisation runs there
        x = torch.as_tensor(batch).to(self.device)
        step = self.max_batch or len(x)
        logits = torch.cat([self._forward(x[i : i + step]) for i in range(0, len(x), step)])
        probs = logits.sigmoid() if self.card.multilabel else logits.softmax(dim=-1)
        return probs.cpu().numpy()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of a uint8 batch. A batch the device has no memory for is split in halves, and the
        size that fitted caps later batches, so a batch size chosen for another GPU slows down, not fails."""
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                return self.model(normalize(x, self.card.preprocess)).float()
        except torch.OutOfMemoryError:
            if len(x) == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = (len(x) + 1) // 2
        self.max_batch = min(self.max_batch or half, half)
        logger.warning(
            "out of memory at a batch of %d images on %s; batches of %d from now on", len(x), self.device, half
        )
        return torch.cat([self._forward(x[:half]), self._forward(x[half:])])

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[dict]:
        """Preprocess and predict a list of images; one result dict per image, in order."""
        if not images:
            return []
        probs = self.predict_batch(np.stack([self.preprocess(im) for im in images]))
        return [format_prediction(p, self.card, top_k) for p in probs]


def make_untrained_model_dir(
    out_dir: str | os.PathLike,
    *,
    model_name: str = "vit_tiny_patch16_224",
    num_classes: int = 4,
    image_size: int = 32,
    multilabel: bool = False,
    class_names: list[str] | None = None,
    model_kwargs: dict | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> ModelCard:
    """A randomly initialised model directory: what tests and examples use where training is not the point."""
    torch.manual_seed(seed)
    model, kwargs = create_model(model_name, num_classes, image_size, model_kwargs=model_kwargs)
    card = ModelCard(
        model_name,
        kwargs,
        num_classes,
        multilabel,
        class_names or [str(i) for i in range(num_classes)],
        PreprocessConfig.from_model(model, image_size),
        precision=precision,
    )
    return save_model_dir(model, card, out_dir)
