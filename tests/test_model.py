"""model.py: the model directory round trip (identical logits, every config.json field, no unpickling),
weights files, transfer loading, and Predictor."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, NUM_CLASSES, TINY_VIT, edited_model_dir, odd_image_bytes
from PIL import Image

from rayimgcls.card import CONFIG_FILE, WEIGHTS_FILE, ModelCard, ModelError, read_card
from rayimgcls.model import (
    Predictor,
    bf16_is_native,
    check_model_name,
    create_model,
    load_model_dir,
    load_weights,
    make_untrained_model_dir,
    resolve_precision,
    save_model_dir,
    use_ieee_fp32,
)


def test_round_trip_gives_identical_logits_and_every_field(tmp_path):
    torch.manual_seed(0)
    model, kwargs = create_model("vit_tiny_patch16_224", 3, IMAGE_SIZE, dropout_rate=0.1, model_kwargs=TINY_VIT)
    from rayimgcls.images import PreprocessConfig

    card = ModelCard(
        "vit_tiny_patch16_224",
        kwargs,
        3,
        True,
        ["a", "b", "c"],
        PreprocessConfig.from_model(model, IMAGE_SIZE),
        precision="fp32",
        training={"epochs": 2},
    )
    save_model_dir(model, card, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert set(cfg) == {
        "schema_version",
        "model",
        "num_classes",
        "multilabel",
        "class_names",
        "preprocess",
        "thresholds",
        "precision",
        "version",
        "training",
        "versions",
    }
    assert cfg["model"] == {
        "name": "vit_tiny_patch16_224",
        "kwargs": {"num_classes": 3, **TINY_VIT, "img_size": IMAGE_SIZE, "drop_rate": 0.1},
    }
    assert cfg["preprocess"]["input_size"] == IMAGE_SIZE and cfg["preprocess"]["interpolation"] == "bicubic"
    assert {"mean", "std", "crop_pct", "crop_mode", "max_pixels"} <= set(cfg["preprocess"])
    assert cfg["thresholds"] == [0.5, 0.5, 0.5]
    assert cfg["version"] == hashlib.sha256((tmp_path / "m" / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert set(cfg["versions"]) == {"rayimgcls", "torch", "timm", "ray"}
    loaded, loaded_card = load_model_dir(tmp_path / "m")
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.eval()
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    assert loaded_card == read_card(tmp_path / "m")


def test_changed_weights_are_refused(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 1
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the version"):
        load_model_dir(copy)
    with pytest.raises(ModelError, match="not a model directory"):
        load_model_dir(tmp_path)


def test_unknown_model_names_are_refused():
    with pytest.raises(ModelError, match="not a timm model"):
        check_model_name("vit_tinyy_patch16_224")
    check_model_name("vit_tiny_patch16_224")


def test_weights_files_load_without_unpickling(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.ones(2)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    assert torch.equal(load_weights(str(tmp_path / "w.safetensors"))["w"], state["w"])
    assert torch.equal(load_weights(str(tmp_path / "w.pth"))["w"], state["w"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="not a weights-only torch file"):
        load_weights(str(tmp_path / "evil.pth"))


def test_predictor_on_paths_bytes_arrays_and_pil(model_dir, odd_images):
    predictor = Predictor.from_dir(model_dir, precision="fp32")
    files = sorted((odd_images / "images").iterdir())
    by_path = predictor.predict(files, top_k=2)
    by_bytes = predictor.predict([f.read_bytes() for f in files], top_k=2)
    for a, b in zip(by_path, by_bytes, strict=True):
        assert a == b
        assert abs(sum(a["predictions"]) - 1) < 1e-5 and len(a["predictions"]) == NUM_CLASSES
        assert [t["score"] for t in a["top_k"]] == sorted(a["predictions"], reverse=True)[:2]
        assert a["top_k"][0]["label"] == predictor.card.class_names[a["top_k"][0]["index"]]
    rgb = Image.open(files[0]).convert("RGB")
    np.testing.assert_allclose(
        predictor.predict([np.asarray(rgb)])[0]["predictions"], predictor.predict([rgb])[0]["predictions"], atol=1e-6
    )
    assert predictor.predict([]) == []


def test_multilabel_predictor_gives_labels_above_thresholds(multilabel_model_dir):
    predictor = Predictor.from_dir(multilabel_model_dir, precision="fp32")
    out = predictor.predict([odd_image_bytes()["rgb.jpg"]])[0]
    assert all(0 <= p <= 1 for p in out["predictions"])
    assert out["labels"] == [n for n, p in zip(predictor.card.class_names, out["predictions"], strict=True) if p >= 0.5]


def test_auto_precision_is_fp32_or_a_measured_win(model_dir):
    model, card = load_model_dir(model_dir)
    assert resolve_precision("fp32", torch.device("cpu"), model) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), model, IMAGE_SIZE) in ("fp32", "bf16")


def test_untrained_model_dir_helper(tmp_path):
    card = make_untrained_model_dir(tmp_path / "m", num_classes=2, image_size=IMAGE_SIZE, model_kwargs=TINY_VIT)
    assert read_card(tmp_path / "m").version == card.version and card.class_names == ["0", "1"]


# ---------------------------------------------------------------------------------------------------------
# GPU paths that can be checked without a GPU


@pytest.mark.parametrize(
    ("capability", "native"),
    [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)],
)
def test_auto_precision_takes_bf16_only_where_gpus_have_it_natively(capability, native):
    # V100 (7.0) and T4 (7.5): torch.cuda.is_bf16_supported() says True there (emulation), bf16 is slower there
    assert bf16_is_native(capability) is native


def test_fp32_on_a_gpu_turns_tf32_off_for_matmuls_and_convolutions():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    assert before[1] == "tf32"  # torch's default: cuDNN convolutions (ViT's patch embedding) in TF32
    try:
        use_ieee_fp32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_a_cuda_device_that_is_not_there_is_refused_with_the_reason(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelError, match=r"device 'cuda': no CUDA device is visible \(torch "):
        Predictor.from_dir(model_dir, device="cuda")


class RefusesLargeBatches(torch.nn.Module):
    """The real model, but a batch above `limit` images fails the way a full GPU fails."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory ({len(x)} images)")
        self.sizes.append(len(x))
        return self.model(x)


def test_a_batch_that_runs_out_of_memory_is_split_and_later_batches_stay_small(model_dir):
    model, card = load_model_dir(model_dir)
    images = np.random.default_rng(0).integers(0, 256, (10, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    whole = Predictor(model, card, torch.device("cpu"), "fp32").predict_batch(images)
    limited = RefusesLargeBatches(model, limit=3)
    predictor = Predictor(limited, card, torch.device("cpu"), "fp32")
    np.testing.assert_allclose(predictor.predict_batch(images), whole, atol=1e-6)
    assert max(limited.sizes) <= 3 and sum(limited.sizes) == 10
    assert predictor.max_batch == 3
    limited.sizes.clear()
    predictor.predict_batch(images)
    assert limited.sizes == [3, 3, 3, 1]  # no second failure: the size that fitted caps the batches
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit: nothing left to split
        Predictor(RefusesLargeBatches(model, limit=0), card, torch.device("cpu"), "fp32").predict_batch(images[:1])


# config.json is untrusted input (issue 10, item 6)


OPENED: list[str] | None = None  # paths opened while a test listens (an audit hook cannot be removed)


def _record_opens(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        OPENED.append(os.fsdecode(args[0]))


def test_a_checkpoint_path_in_config_json_is_refused_without_opening_it(model_dir, tmp_path):
    """timm would torch.load `checkpoint_path` before our sha256 check of the weights. Python's audit hook
    sees every open(): the file must never be among them."""
    import sys

    global OPENED
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"head.weight": torch.zeros(4, 48)}, checkpoint)
    edited = edited_model_dir(
        model_dir, tmp_path, lambda c: c["model"]["kwargs"].update(checkpoint_path=str(checkpoint))
    )
    sys.addaudithook(_record_opens)
    OPENED = []
    try:
        with pytest.raises(ModelError, match="model kwarg 'checkpoint_path'.*not an architecture setting"):
            Predictor.from_dir(edited, precision="fp32")
        with pytest.raises(ModelError, match="checkpoint_path"):
            load_model_dir(edited)
        opened = list(OPENED)
    finally:
        OPENED = None
    assert str(checkpoint) not in opened and any(p.endswith(CONFIG_FILE) for p in opened)


def test_training_accepts_only_the_kwargs_a_model_dir_may_hold():
    from rayimgcls.config import ConfigError, TrainConfig

    TrainConfig(data_root="d", model_kwargs=dict(TINY_VIT))
    with pytest.raises(ConfigError, match="model kwarg 'checkpoint_path'"):
        TrainConfig(data_root="d", model_kwargs={"checkpoint_path": "/tmp/x.pth"})
    with pytest.raises(ConfigError, match="'hf-hub:timm/x': a model source"):
        TrainConfig(data_root="d", model="hf-hub:timm/x")
