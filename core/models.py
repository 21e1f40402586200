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


def load_model(spec: str | os.PathLike, image_size: tuple[int, int] | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """`default`, `tiny`, `toy` or a local Hugging Face checkpoint folder -> (eval model, input shape (1, C, H, W));
    `image_size` (H, W) replaces the config's size in the shape (checked with resize_kwargs: the model must
    interpolate its position embeddings)."""
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
    shape = input_shape(model, image_size)
    resize_kwargs(model, shape[-2:])  # a model that cannot take that size fails here, before the export
    return model, shape


def _load_hf_dir(path: Path) -> nn.Module:
    if not path.is_dir():
        raise ModelError(f"Model {str(path)!r} is neither a built-in model ({', '.join([*BUILTIN, *SHIPPED])}) nor a folder; pass --model default or a local HF checkpoint folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"Model folder {str(path)!r} has no config.json; pass a folder written by save_pretrained()")
    check_model_folder(path)  # custom code (auto_map) is refused before transformers reads the folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoConfig

        with quiet_loading():   # no config warnings (default token ids of a text tower) on stderr: errors stay one line
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError variants
        raise ModelError(f"Cannot load model folder {str(path)!r}: {first_line(e, 200)}") from e
    kind = getattr(config, "model_type", None)
    if kind in VLM_TYPES:
        raise ModelError(f"Model folder {str(path)!r} is a {VLM_TYPES[kind]} vision-language model; `tokensieve export` "
                         f"takes a vision encoder, so export it in parts: tokensieve export-vlm {path} "
                         "--prune cls-topk:0.25 -o OUT")
    auto, load_config = model_class(config, path)
    try:
        with quiet_loading():
            extra = {"config": load_config} if load_config is not None else {}
            model, info = auto.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                               output_loading_info=True, **extra, **SAFE_LOADING)
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
VLM_TYPES = {"llava": "LLaVA", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "internvl": "InternVL",
             "gemma3": "Gemma 3", "qwen3_vl": "Qwen3-VL"}
# model_type of a dual encoder -> the transformers class of its vision tower with its image-embedding head (pooler
# + projection; loads from the full checkpoint)
VISION_TOWERS = {"clip": "CLIPVisionModelWithProjection", "siglip": "SiglipVisionModel"}
# model_types `tokensieve export` refuses with a reason: their forward does not take (B, C, H, W) images
UNSUPPORTED = {"siglip2": "SigLIP2 NaFlex (patchified inputs, not images)",
               "siglip2_vision_model": "SigLIP2 NaFlex (patchified inputs, not images)"}


def model_class(config, path: Path):
    """The transformers class a folder's config loads as -> (class, config to load it with or None): the vision tower
    (+ embedding head) of a dual encoder; else the class config.architectures names, when transformers has it and it
    is a vision encoder or classifier (…ForImageClassification…, …WithTeacher, …VisionModel…, …Model); else
    AutoModelForImageClassification / AutoModel."""
    import transformers

    kind = getattr(config, "model_type", None)
    if kind in UNSUPPORTED:
        raise ModelError(f"Model folder {str(path)!r} is {UNSUPPORTED[kind]}, which `tokensieve export` cannot trace; "
                         "export a FixRes SigLIP2 checkpoint (model_type siglip) instead")
    if kind in VISION_TOWERS:
        auto = getattr(transformers, VISION_TOWERS[kind], None)
        if auto is None:
            raise ModelError(f"Model folder {str(path)!r} is a {kind!r} dual encoder, which this transformers "
                             f"{transformers.__version__} cannot load ({VISION_TOWERS[kind]} missing); upgrade "
                             "transformers")
        tower = config.vision_config
        if getattr(config, "projection_dim", None) is not None and hasattr(tower, "projection_dim"):
            tower.projection_dim = config.projection_dim  # CLIP keeps the projection size on the full config
        return auto, tower
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise ModelError(f"Model folder {str(path)!r} is a {kind!r} vision-language model, which tokensieve cannot "
                         f"split yet; export-vlm supports {', '.join(sorted(VLM_TYPES))}, export supports vision "
                         f"encoders (and the vision tower of {', '.join(sorted(VISION_TOWERS))})")
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    for name in archs:
        cls = getattr(transformers, name, None) if name.isidentifier() else None
        if isinstance(cls, type) and ("ForImageClassification" in name or name.endswith(("Model", "WithProjection"))):
            return cls, None
    if any("ForImageClassification" in a for a in archs):
        return transformers.AutoModelForImageClassification, None
    return transformers.AutoModel, None


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


def input_shape(model: nn.Module, image_size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """(1, C, H, W) of the model's config, or with `image_size` (H, W) in place of the config's size."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    channels = getattr(cfg, "num_channels", 3)
    if image_size is not None:
        h, w = _check_size(image_size)
        return (1, channels, h, w)
    size = getattr(cfg, "image_size", None)
    if size is None:
        raise ModelError("Cannot tell the model's input size (no config.image_size); pass --image-size H[,W]")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (1, channels, h, w)


def _check_size(image_size) -> tuple[int, int]:
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise ModelError(f"--image-size {image_size!r} must be H or H,W, integers >= 1, e.g. 224 or 224,160")
    return size


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Make `model`'s heads traceable to a static ONNX, in place, with the same values: SigLIP's attention-pooling
    head repeats its probe by the batch read from the input, which ONNX shape inference cannot size (Tile), so its
    forward expands the probe instead (Expand, which it can)."""
    import types

    for module in model.modules():
        if (type(module).__name__ == "SiglipMultiheadAttentionPoolingHead" and "forward" not in vars(module)
                and isinstance(getattr(module, "probe", None), nn.Parameter)):
            module.forward = types.MethodType(_pooling_head_forward, module)
    return model


def _pooling_head_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """SiglipMultiheadAttentionPoolingHead.forward (transformers 4.57 / 5.x) with probe.expand for probe.repeat."""
    probe = self.probe.expand(hidden_state.shape[0], -1, -1)
    hidden_state = self.attention(probe, hidden_state, hidden_state)[0]
    residual = hidden_state
    hidden_state = self.layernorm(hidden_state)
    hidden_state = residual + self.mlp(hidden_state)
    return hidden_state[:, 0]


# model_type of models whose embeddings interpolate the position table at every call (forward takes no flag)
INTERPOLATES_ALWAYS = ("dinov2", "dinov2_with_registers")


def resize_kwargs(model: nn.Module, size: tuple[int, int]) -> dict:
    """The forward kwargs with which `model` takes (H, W) = `size` images: {} at the config's size, for a model that
    is not a transformers one, or one that interpolates its position embeddings itself (DINOv2);
    {"interpolate_pos_encoding": True} where forward takes that flag (ViT, DeiT, CLIP, SigLIP); else a one-line
    ModelError (the model cannot change its input size)."""
    import inspect

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        return {}
    cfg = getattr(cfg, "vision_config", cfg)
    configured = getattr(cfg, "image_size", None)
    configured = (configured, configured) if isinstance(configured, int) else tuple(configured or ())
    h, w = (int(v) for v in size)
    if (h, w) == configured or not configured:  # no configured size: nothing to interpolate against
        return {}
    patch = getattr(cfg, "patch_size", None)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch or (1, 1))
    if h % patch[0] or w % patch[1]:
        raise ModelError(f"--image-size {h},{w} is not a multiple of the model's patch size {patch[0]}x{patch[1]}; "
                         f"pass e.g. --image-size {max(patch[0], h - h % patch[0])},{max(patch[1], w - w % patch[1])}")
    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        return {"interpolate_pos_encoding": True}
    if getattr(cfg, "model_type", None) in INTERPOLATES_ALWAYS or getattr(model.config, "model_type", None) in INTERPOLATES_ALWAYS:
        return {}
    size_text = "x".join(map(str, configured)) if configured else "its configured size"
    raise ModelError(f"{type(model).__name__} cannot change its input size (no position-embedding interpolation); "
                     f"export it at {size_text} (drop --image-size)")


def hf_files(spec: str | os.PathLike, model: nn.Module, shape: tuple[int, ...]) -> dict[str, bytes]:
    """The HF files an export folder holds beside its ONNX, name -> content: the model folder's config.json (copied
    as it is when the exported class and input size are the folder's own; else the loaded model's config with its
    class in `architectures` and `image_size` the exported H, W) and its preprocessor_config.json when it has one
    (its output size set to the exported H, W where it differs: _resized_processor);
    for `default`/`tiny`, the config the model was built from and a ViTImageProcessor config at its size."""
    import json

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    folder = model_dir(spec)
    h, w = (int(v) for v in shape[-2:])
    name = type(model).__name__
    files = {}
    source = folder / "config.json" if folder is not None else None
    if source is not None and source.is_file():
        text = source.read_bytes()
        try:
            own = json.loads(text)
        except ValueError:
            own = {}
        size = own.get("image_size") if isinstance(own, dict) else None
        if isinstance(own, dict) and name in (own.get("architectures") or []) and size in ((h, w), [h, w], h if h == w else None):
            files["config.json"] = text
    if "config.json" not in files:
        data = cfg.to_dict()
        data = {k: v for k, v in data.items() if k != "_name_or_path"}   # where it was loaded from: not the model's
        data["architectures"] = [name]
        data["image_size"] = h if h == w else [h, w]
        files["config.json"] = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()
    processor = folder / "preprocessor_config.json" if folder is not None else None
    if processor is not None and processor.is_file():
        files["preprocessor_config.json"] = _resized_processor(processor.read_bytes(), h, w)
    elif str(spec) in BUILTIN:
        from transformers import ViTImageProcessor

        files["preprocessor_config.json"] = ViTImageProcessor(size={"height": h, "width": w}).to_json_string().encode()
    return files


def _resized_processor(text: bytes, h: int, w: int) -> bytes:
    """A preprocessor_config.json whose images come out (h, w), what the ONNX takes: unchanged if they do (or if its
    layout is not one of these); else its crop_size set to (h, w) (a shortest_edge resize scaled alike), or, without
    a center crop, its size {height, width}."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return text
    if not isinstance(data, dict):
        return text
    size, crop = data.get("size"), data.get("crop_size")
    if data.get("do_center_crop") and isinstance(crop, dict) and {"height", "width"} <= crop.keys():
        old = (crop["height"], crop["width"])
        if old == (h, w):
            return text
        data["crop_size"] = {"height": h, "width": w}
        if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int) and isinstance(old[0], int) and old[0]:
            data["size"] = {**size, "shortest_edge": round(size["shortest_edge"] * min(h, w) / min(old))}
    elif isinstance(size, dict) and {"height", "width"} <= size.keys():
        if (size["height"], size["width"]) == (h, w):
            return text
        data["size"] = {**size, "height": h, "width": w}
    else:
        return text
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
