"""Which timm model names and kwargs we build: plain architectures only (a model directory's config.json is
untrusted input and its kwargs reach timm.create_model; training accepts the same list for --model-kwargs)."""

from __future__ import annotations

import difflib

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
