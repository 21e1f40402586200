"""Which patches each pruning stage keeps, drawn on the input image (eager reference only: no ONNX runs).

A stage's kept indices index the sequence ENTERING that stage: the prefix tokens, then the tokens the
previous stage left (plus extra tokens such as EViT's fused token or PosPad's markers, which are not
patches). `token_origins` composes the stages to map every position back to its original patch (or -1),
and `kept_patch_masks` turns that into one boolean mask over the patch grid per stage. For merging
methods (ToMe, token transforming) the kept positions are the surviving tokens.

matplotlib draws the figure (Agg canvas, no pyplot state) and reads the image; it is imported lazily
(`pip install tokensieve[plot]`).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from tokensieve.errors import ConfigError, first_line
from tokensieve.fileio import atomic_path, ensure_writable_dir
from tokensieve.recipe import Recipe, ResolvedStage

__all__ = ["token_origins", "kept_patch_masks", "load_image", "normalization", "to_pixels", "check_output", "render",
           "visualize"]

DIM = 0.2  # brightness left on a dropped patch
# An input image is resized to the model's (a few hundred pixels): larger ones are refused before they are decoded
# (a PNG header may claim 100000 x 100000 pixels: 40 GB decoded).
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 256 << 20


# --------------------------------------------------------------------------- kept positions -> patches (pure)


def token_origins(kept: list[np.ndarray], stages: list[ResolvedStage], num_prefix_tokens: int,
                  num_patches: int) -> list[np.ndarray]:
    """Per stage, the original patch index of every position of the sequence LEAVING it (-1: not a patch).

    `kept[s]` (K,) are the positions stage s keeps in the sequence entering it (as run_reference returns them).
    """
    if len(kept) != len(stages):
        raise ConfigError(f"{len(kept)} kept-index arrays for {len(stages)} stages; pass one per stage")
    p = num_prefix_tokens
    origin = np.concatenate([np.full(p, -1), np.arange(num_patches)])
    out = []
    for idx, rs in zip(kept, stages):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(origin) != rs.tokens_in or len(idx) != rs.keep:
            raise ConfigError(f"stage after block {rs.stage.after_block} expects {rs.tokens_in} tokens in and {rs.keep} "
                              f"kept, got {len(origin)} and {len(idx)}; pass the kept indices of one resolved recipe")
        if rs.options.get("pospad"):
            idx = _pospad_positions(idx, rs)
        valid = (idx >= 0) & (idx < len(origin))
        body = np.where(valid, origin[np.clip(idx, 0, len(origin) - 1)], -1)
        origin = np.concatenate([np.full(p, -1), body])
        origin = np.concatenate([origin, np.full(max(0, rs.tokens_out - len(origin)), -1)])  # fused token etc.
        out.append(origin)
    return out


def _pospad_positions(idx: np.ndarray, rs: ResolvedStage) -> np.ndarray:
    """Sequence positions after a PosPad stage: kept tokens keep theirs; markers and padding slots get -1."""
    import torch

    from tokensieve.graph_passes.methods.pospad import pospad_slots, pospad_tokens

    p, n = rs.num_prefix_tokens, rs.tokens_in - rs.num_prefix_tokens
    t = torch.as_tensor(idx).view(1, -1)
    _, positions = pospad_tokens(torch.zeros(1, rs.tokens_in, 1), t, pospad_slots(n, len(idx)), p)
    positions = positions[0].numpy()
    return np.where(np.isin(positions, idx), positions, -1)


def kept_patch_masks(kept: list[np.ndarray], stages: list[ResolvedStage], num_prefix_tokens: int,
                     num_patches: int) -> list[np.ndarray]:
    """Per stage, a (num_patches,) bool mask: True where an original patch is still a token after the stage."""
    masks = []
    for origin in token_origins(kept, stages, num_prefix_tokens, num_patches):
        m = np.zeros(num_patches, dtype=bool)
        m[origin[origin >= 0]] = True
        masks.append(m)
    return masks


# --------------------------------------------------------------------------- image in


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("visualize needs matplotlib: pip install tokensieve[plot]") from None
    import matplotlib.image

    return matplotlib


def load_image(path: str | Path, size: tuple[int, int], center_crop: bool = False) -> np.ndarray:
    """Read an image (PNG; JPEG and others through Pillow) -> (H, W, 3) float32 in [0, 1], resized to `size`; with
    `center_crop`, the centered region of `size`'s aspect ratio first (an image processor's shortest-edge resize +
    center crop, as CLIP's does), else the whole image stretched (ViT's plain resize)."""
    import torch
    import torch.nn.functional as F

    mpl = _matplotlib()
    path = Path(path)
    raw = _image_bytes(path)
    if path.suffix.lower() != ".png":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ConfigError(f"Reading {path.suffix or 'non-PNG'} images needs Pillow: pip install pillow "
                              "(or convert the image to PNG)") from None
    try:
        img = np.asarray(mpl.image.imread(io.BytesIO(raw), format=path.suffix.lower().lstrip(".") or None))
    except Exception as e:  # noqa: BLE001 - Pillow / matplotlib raise many types for a bad file
        raise ConfigError(f"{str(path)!r} is not a readable image ({first_line(e, 120)}); pass a PNG or JPEG file") from e
    if img.dtype.kind in "ui":
        img = img.astype(np.float32) / np.iinfo(img.dtype).max
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ConfigError(f"{str(path)!r} has shape {img.shape}, not an image; pass a PNG or JPEG file")
    img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
    if center_crop:
        img = _center_region(img, size)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _center_region(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The largest centered region of `img` with the aspect ratio of `size` (H, W)."""
    h, w = img.shape[:2]
    th, tw = size
    ch, cw = (h, max(1, round(h * tw / th))) if w * th > h * tw else (max(1, round(w * th / tw)), w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top:top + ch, left:left + cw]


def center_crops(model_dir: str | Path | None) -> bool:
    """Does the model folder's image processor center-crop (preprocessor_config.json `do_center_crop`)?"""
    pre = Path(model_dir) / "preprocessor_config.json" if model_dir else None
    if pre is None or not pre.is_file():
        return False
    from tokensieve.manifest import read_json_object

    return read_json_object(pre, "the image processor config", "fix or remove it").get("do_center_crop") is True


def _image_bytes(path: Path) -> bytes:
    """The file's bytes, once its header shows at most MAX_IMAGE_PIXELS pixels; one-line ConfigError for a missing
    file, a FIFO / device / folder, a file over MAX_IMAGE_BYTES or a header claiming more pixels (nothing decoded)."""
    from tokensieve.manifest import read_regular_file

    fix = "pass a PNG or JPEG file"
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"Image {str(path)!r} does not exist; {fix}")
    raw = read_regular_file(path, "image", fix, limit=MAX_IMAGE_BYTES)
    size = _header_size(raw)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ConfigError(f"Image {str(path)!r} is {size[0]}x{size[1]} pixels, more than {MAX_IMAGE_PIXELS:,} "
                          "(it would be decoded in full before resizing); downscale it first")
    return raw


def _header_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels: PNG's IHDR, else Pillow's lazy open; None if
    neither can tell (the decoder then refuses the file)."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            return im.size
    except Exception:  # noqa: BLE001 - not an image Pillow knows (or no Pillow): imread reports it
        return None


def normalization(model, model_dir: str | Path | None = None) -> tuple[list[float], list[float]]:
    """(mean, std) per channel: the model config's, else the folder's preprocessor_config.json, else 0.5 / 0.5."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    mean, std = getattr(cfg, "image_mean", None), getattr(cfg, "image_std", None)
    pre = Path(model_dir) / "preprocessor_config.json" if model_dir else None
    if (mean is None or std is None) and pre is not None and pre.is_file():
        from tokensieve.manifest import read_json_object

        data = read_json_object(pre, "the image processor config", "fix or remove it")
        mean, std = data.get("image_mean"), data.get("image_std")
    if mean is None or std is None:
        return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    mean, std = _channel_values(mean, "image_mean", pre), _channel_values(std, "image_std", pre, positive=True)
    return (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)


def _channel_values(value, name: str, where: Path | None, positive: bool = False) -> list[float]:
    """1 or 3 finite numbers (> 0 for std) from a model config / preprocessor_config.json; one line otherwise."""
    import numbers

    values = list(value.reshape(-1)) if isinstance(value, np.ndarray) else value if isinstance(value, (list, tuple)) \
        else [value]
    ok = 1 <= len(values) <= 4 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                                       and (v > 0 or not positive) for v in values)
    if not ok:
        from tokensieve.manifest import excerpt

        raise ConfigError(f"{name} {excerpt(value, 40)} in {str(where or 'the model config')!r} must be 1 or 3 finite "
                          f"numbers{' > 0' if positive else ''}; fix or remove it")
    return [float(v) for v in values]


def to_pixels(image: np.ndarray, mean, std, channels: int = 3):
    """(H, W, 3) in [0, 1] -> normalized (1, C, H, W) float32 tensor; a 1-channel model gets the gray mean."""
    import torch

    x = image.mean(axis=2, keepdims=True) if channels == 1 else image
    x = (x - np.asarray(mean[:channels], np.float32)) / np.asarray(std[:channels], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None]


# --------------------------------------------------------------------------- figure out


def _pixel_mask(mask: np.ndarray, grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(gh·gw,) patch mask -> (H, W) brightness: 1 on kept patches, DIM on dropped ones (and on the border the
    patch embedding never reads, if H or W is not a multiple of the patch size)."""
    gh, gw = grid
    ph, pw = shape[0] // gh, shape[1] // gw
    m = np.full(shape, DIM, np.float32)
    m[:gh * ph, :gw * pw] = np.where(np.kron(mask.reshape(gh, gw), np.ones((ph, pw))) > 0, 1.0, DIM)
    return m


def check_output(out: str | Path) -> Path:
    """-o must be a .png path in a writable (or creatable) folder; checked before the export, creating nothing."""
    from tokensieve.manifest import check_creatable_dir

    out = Path(out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ConfigError(f"-o {str(out)!r}: visualize writes a PNG; give a path ending in .png")
    check_creatable_dir(out.parent, "-o")
    return out


def render(image: np.ndarray, masks: list[np.ndarray], grid: tuple[int, int], titles: list[str], out: str | Path,
           title: str = "") -> Path:
    """Write a PNG: the image then one panel per mask, dropped patches dimmed, the patch grid drawn over it."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = check_output(out)
    gh, gw = grid
    h, w = image.shape[:2]
    panels = [np.ones(gh * gw, bool)] + list(masks)
    fig = Figure(figsize=(3.2 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, (mask, name) in enumerate(zip(panels, ["input"] + list(titles))):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image * _pixel_mask(mask, grid, (h, w))[..., None], interpolation="nearest")
        ax.vlines(np.arange(1, gw) * (w // gw) - 0.5, -0.5, gh * (h // gh) - 0.5, colors="white", linewidths=0.4, alpha=0.5)
        ax.hlines(np.arange(1, gh) * (h // gh) - 0.5, -0.5, gw * (w // gw) - 0.5, colors="white", linewidths=0.4, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    ensure_writable_dir(out.parent)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def visualize(model, recipe: Recipe, image_path: str | Path, out: str | Path, *, model_dir: str | Path | None = None,
              model_name: str = "model") -> dict:
    """Run the eager reference of `recipe` on the image and draw which patches survive each stage -> summary."""
    from tokensieve import api
    from tokensieve.models import input_shape

    if not recipe.stages and recipe.schedule is None:  # a schedule (tome(r=8)) has its stages once bound
        raise ConfigError("visualize needs a recipe with at least one stage, e.g. --prune cls-topk@3,6,9:0.7")
    _, channels, h, w = input_shape(model)
    check_output(out)
    image = load_image(image_path, (h, w), center_crops(model_dir))  # bad image / output / missing matplotlib fail first
    mean, std = normalization(model, model_dir)
    x = to_pixels(image, mean, std, channels)
    result = api.plan(model, x, recipe)  # eager only: no ONNX conversion
    if result.layout.grid is None:
        raise ConfigError("visualize needs the model's patch grid (a conv patch embedding); this model has none")
    _, kept = result.reference(x)
    kept = [k[0].numpy() for k in kept]
    lay = result.layout
    masks = kept_patch_masks(kept, result.stages, lay.num_prefix_tokens, lay.num_patches)
    titles = [f"after block {rs.stage.after_block} ({rs.stage.method}): {int(m.sum())}/{lay.num_patches}"
              for rs, m in zip(result.stages, masks)]
    render(image, masks, lay.grid, titles, out,
           title=f"{model_name}  {recipe}   (dimmed: patches dropped by that stage; [CLS] and other prefix tokens "
                 "are always kept)")
    return {"image": str(image_path), "output": str(out), "recipe": recipe.shorthand(), "grid": list(lay.grid),
            "num_prefix_tokens": lay.num_prefix_tokens, "kept_patches": [int(m.sum()) for m in masks],
            "kept_positions": [k.tolist() for k in kept], "patches": [np.flatnonzero(m).tolist() for m in masks],
            "mean": mean, "std": std}
