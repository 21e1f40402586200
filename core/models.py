"""Model sources: the bundled default (ViT-S/16-224, deterministic random init), a tiny ViT, or a local HF folder."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from tokensieve.errors import ModelError, first_line
from tokensieve.trust import check_model_folder

BUILTIN = {
    # name: (ViTConfig kwargs, summary)
    "default": (dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16, num_labels=1000), "ViT-S/16-224 (HF ViTForImageClassification, random init)"),
    "tiny": (dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  image_size=64, patch_size=8, num_labels=10), "tiny ViT (64x64 image, 8x8 patches, 4 blocks)"),
}


def builtin_vit(name: str = "default", seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    kwargs, _ = BUILTIN[name]
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**kwargs, attn_implementation="sdpa"))
    return model.eval()


# trained models shipped as HF folders inside the package: name -> (folder, summary)
SHIPPED = {
    "toy": (Path(__file__).resolve().parent / "toy_vit",
            "toy ViT trained on generated shapes (64x64, 8x8 patches, 6 blocks; scripts/train_toy_vit.py)"),
}


def model_dir(spec: str | os.PathLike) -> Path | None:
    """The HF folder a model spec loads from (its config.json, preprocessor_config.json), or None for `default`/`tiny`."""
    spec = str(spec)
    if spec in BUILTIN:
        return None
    return SHIPPED[spec][0] if spec in SHIPPED else Path(spec)


def load_model(spec: str | os.PathLike) -> tuple[nn.Module, tuple[int, ...]]:
    """`default`, `tiny`, `toy` or a local Hugging Face checkpoint folder -> (eval model, input shape (1, C, H, W))."""
    spec = str(spec)
    if spec in BUILTIN:
        model = builtin_vit(spec)
    elif spec in SHIPPED:
        folder = SHIPPED[spec][0]
        if not (folder / "model.safetensors").is_file():
            raise ModelError(f"The {spec} model's weights are missing from {str(folder)!r}; regenerate them with "
                             f"python -m tokensieve.scripts.train_toy_vit -o {folder}")
        model = _load_hf_dir(folder)
    else:
        model = _load_hf_dir(Path(spec))
    return model, input_shape(model)


def _load_hf_dir(path: Path) -> nn.Module:
    if not path.is_dir():
        raise ModelError(f"Model {str(path)!r} is neither a built-in model ({', '.join([*BUILTIN, *SHIPPED])}) nor a folder; pass --model default or a local HF checkpoint folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"Model folder {str(path)!r} has no config.json; pass a folder written by save_pretrained()")
    check_model_folder(path)  # custom code (auto_map) is refused before transformers reads the folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError variants
        raise ModelError(f"Cannot load model folder {str(path)!r}: {first_line(e, 200)}") from e
    kind = getattr(config, "model_type", None)
    if kind in VLM_TYPES:
        raise ModelError(f"Model folder {str(path)!r} is a {VLM_TYPES[kind]} vision-language model; `tokensieve export` "
                         f"takes a vision encoder, so export it in parts: tokensieve export-vlm {path} "
                         "--prune cls-topk:0.25 -o OUT")
    if kind in VISION_TOWERS:  # a dual encoder (image + text): its vision tower alone
        auto = getattr(transformers, VISION_TOWERS[kind])
    elif hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise ModelError(f"Model folder {str(path)!r} is a {kind!r} vision-language model, which tokensieve cannot "
                         f"split yet; export-vlm supports {', '.join(sorted(VLM_TYPES))}, export supports vision "
                         f"encoders (and the vision tower of {', '.join(sorted(VISION_TOWERS))})")
    else:
        auto = AutoModelForImageClassification if getattr(config, "architectures", None) and any(
            a.endswith("ForImageClassification") for a in config.architectures) else AutoModel
    try:
        with quiet_loading():
            model, info = auto.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                               output_loading_info=True, **SAFE_LOADING)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"Cannot load model folder {str(path)!r}: {first_line(e, 200)}") from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # randomly initialized weights: exportable, but the user should know (one line, not HF's table)
        print(f"tokensieve: warning: {len(missing)} weight(s) of {type(model).__name__} are not in {str(path)!r} and "
              f"stay randomly initialized (e.g. {missing[0]!r})", file=sys.stderr)
    return model.eval()


# every from_pretrained of a model: no custom code, no stdin prompt, and weights from safetensors only (a
# pytorch_model.bin is a pickle: refused by transformers with "no file named model.safetensors", never unpickled)
SAFE_LOADING = dict(trust_remote_code=False, use_safetensors=True, weights_only=True)


# model_type -> what it is: checkpoints `tokensieve export-vlm` takes, not `export`
VLM_TYPES = {"llava": "LLaVA", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
# model_type of a dual encoder -> the transformers class of its vision tower (loads from the full checkpoint)
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


@contextlib.contextmanager
def quiet_loading():
    """No "Loading weights" progress bar and no multi-line "LOAD REPORT" table on stderr: errors stay one line,
    summaries stay readable (the loader reports missing weights itself, in one line)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def input_shape(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    size = getattr(cfg, "image_size", None)
    if size is None:
        raise ModelError("Cannot tell the model's input size (no config.image_size); pass --input-shape B,C,H,W")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (1, getattr(cfg, "num_channels", 3), h, w)
