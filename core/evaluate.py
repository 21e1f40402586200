"""Accuracy next to latency: run an export folder's model.onnx and dense.onnx on the user's images.

    from tokensieve.evaluate import evaluate
    result = evaluate("out/", "images/")          # images/<class>/*.png|jpg, or images/*.png (no labels)

Images are preprocessed with the model folder's own image processor (transformers AutoImageProcessor from a
preprocessor_config.json: the export folder's, else the exported model's folder, else `processor=`). Labels come from
an ImageFolder layout DIR/<class>/*: a class folder's index is the model's config.id2label id of its name when every
folder name is one of id2label's names, else its position among the sorted folder names. Reports top-1 / top-5
accuracy (with labels), top-1 agreement of the pruned model with the dense one, each with a Wilson 95 % interval,
and the top-1 drop (dense - pruned) with a paired bootstrap 95 % interval.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensieve.errors import ConfigError, first_line

SCHEMA = "tokensieve.eval/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREPROCESSOR = "preprocessor_config.json"
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (Wilson 1927); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def proportion(hits: np.ndarray) -> dict:
    k, n = int(hits.sum()), int(hits.size)
    lo, hi = wilson(k, n)
    return {"value": k / n if n else float("nan"), "ci95": [lo, hi], "count": k, "n": n}


def paired_drop(dense_hits: np.ndarray, pruned_hits: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """dense - pruned accuracy with a paired percentile bootstrap 95 % interval (same images resampled for both)."""
    diff = dense_hits.astype(np.float64) - pruned_hits.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
    return {"value": float(diff.mean()), "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "n": int(diff.size), "bootstrap_resamples": resamples}


# ------------------------------------------------------------------------------------------- images


@dataclass
class ImageSet:
    paths: list[Path]
    labels: np.ndarray | None            # (n,) class index per image, None without a class layout
    class_names: list[str]               # folder names, sorted
    label_mapping: str | None            # "id2label" | "sorted" | None


def scan_images(images_dir: str | Path, id2label: dict[int, str] | None = None) -> ImageSet:
    """The images of `images_dir`: DIR/<class>/<image> (labelled) or DIR/<image> (unlabelled)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise ConfigError(f"Image folder {str(root)!r} does not exist; pass a folder of images (DIR/<class>/*.png)")

    def images_in(d: Path) -> list[Path]:  # a FIFO or device named like an image is kept: load_image refuses it
        return sorted(p for p in d.iterdir() if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and images_in(d))
    top = images_in(root)
    if classes and top:
        raise ConfigError(f"{str(root)!r} holds both images and class folders; put every image in a class folder "
                          "(DIR/<class>/*.png) or none (DIR/*.png, no labels)")
    if not classes:
        if not top:
            raise ConfigError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}; pass a folder with "
                              "DIR/<class>/*.png (labelled) or DIR/*.png (unlabelled)")
        return ImageSet(top, None, [], None)
    names = {v: int(k) for k, v in (id2label or {}).items()}
    mapping = "id2label" if names and all(c in names for c in classes) else "sorted"
    index = {c: (names[c] if mapping == "id2label" else i) for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in classes:
        for p in images_in(root / c):
            paths.append(p)
            labels.append(index[c])
    return ImageSet(paths, np.asarray(labels, np.int64), classes, mapping)


def load_image(path: Path):
    """The image as RGB; one-line ConfigError for a file that is not a regular one (a FIFO, /dev/zero: nothing read),
    is larger than MAX_IMAGE_BYTES, whose header claims more than MAX_IMAGE_PIXELS (not decoded), or is unreadable."""
    import io

    from tokensieve.manifest import read_regular_file
    from tokensieve.visualize import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, _header_size

    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("Reading images needs Pillow; pip install pillow") from None
    fix = "remove or replace the file"
    raw = read_regular_file(path, "image", fix, limit=MAX_IMAGE_BYTES)
    size = _header_size(raw)  # the header only (visualize's check): nothing decoded yet
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ConfigError(f"Image {str(path)!r} is {size[0]}x{size[1]} pixels, more than {MAX_IMAGE_PIXELS:,} "
                          f"(decoded in full before resizing); downscale it or {fix}")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
        raise ConfigError(f"Cannot read image {str(path)!r}: {first_line(e, 120)}; {fix}") from e


def find_processor_dir(folder: Path, report: dict, processor: str | Path | None) -> Path:
    """Where preprocessor_config.json is: `processor`, else the export folder, else the exported model's folder."""
    from tokensieve.models import model_dir

    if processor is not None:
        candidates = [Path(processor)]
    else:
        candidates = [folder] + [d for d in [model_dir(report.get("model", ""))] if d is not None]
    for d in candidates:
        if (d / PREPROCESSOR).exists() or (d / PREPROCESSOR).is_symlink():  # not a regular file: load_processor says so
            return d
    where = " or ".join(repr(str(d)) for d in candidates)
    raise ConfigError(f"No {PREPROCESSOR} in {where}; pass --processor DIR with the model's image processor "
                      "(a folder written by an image processor's save_pretrained())")


def load_processor(d: Path):
    import os

    from tokensieve.manifest import read_regular_file
    from tokensieve.trust import MODEL_CONFIG_FILES, check_model_folder

    fix = "re-save it with save_pretrained() or pass another --processor DIR"
    for name in MODEL_CONFIG_FILES:  # what transformers may read here: regular files of a bounded size, or absent
        if name == PREPROCESSOR or (d / name).exists() or (d / name).is_symlink():
            read_regular_file(d / name, "config", fix)
    check_model_folder(d, ConfigError, weights=False)  # an image processor's auto_map: refused, never asked about
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoImageProcessor
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoImageProcessor.from_pretrained(d, local_files_only=True, trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"Cannot load the image processor in {str(d)!r}: {first_line(e, 160)}; fix its "
                          f"{PREPROCESSOR}") from e


def _id2label(report: dict) -> dict[int, str] | None:
    from tokensieve.models import model_dir

    from tokensieve.manifest import read_json_object

    d = model_dir(report.get("model", ""))
    if d is None or not ((d / "config.json").exists() or (d / "config.json").is_symlink()):
        return None
    # bounded: a FIFO, a device or a huge file is one line, not a hang
    cfg = read_json_object(d / "config.json", "a model config", "re-save the model with save_pretrained()")
    labels = cfg.get("id2label")
    try:
        return {int(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None
    except (TypeError, ValueError):  # ids that are not integers: no label mapping (folders sorted instead)
        return None


# ------------------------------------------------------------------------------------------- evaluate


def evaluate(folder: str | Path, images: str | Path, *, processor: str | Path | None = None, batch: int = 32,
             threads: int | None = None, limit: int | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Run OUT/model.onnx and OUT/dense.onnx (ONNX Runtime) on the images of `images`; a JSON-able result."""
    from tokensieve.api import read_export_report
    from tokensieve.runtime.onnxruntime_runner import OrtRunner

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch={batch!r} must be a positive integer")
    folder = Path(folder)
    report = read_export_report(folder)
    for name in ("model.onnx", "dense.onnx"):
        if not (folder / name).is_file():
            raise ConfigError(f"{str(folder)!r} has no {name}; re-run `tokensieve export` into it")
    id2label = _id2label(report)
    imgs = scan_images(images, id2label)
    if limit is not None:
        imgs.paths = imgs.paths[:limit]
        imgs.labels = None if imgs.labels is None else imgs.labels[:limit]
    proc_dir = find_processor_dir(folder, report, processor)
    proc = load_processor(proc_dir)
    t0 = time.perf_counter()
    runners = {"pruned": OrtRunner(folder / "model.onnx", threads=threads),
               "dense": OrtRunner(folder / "dense.onnx", threads=threads)}
    logits: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    n = len(imgs.paths)
    with runners["pruned"], runners["dense"]:
        name, dims, dtype = runners["pruned"].input_specs[0]
        want = tuple(int(d) for d in dims[1:]) if all(isinstance(d, int) for d in dims[1:]) else None
        static_batch = dims[0] if isinstance(dims[0], int) else None
        step = static_batch or batch
        backend = runners["pruned"].device_label
        every = max(1, math.ceil(n / step) // 10)
        for start in range(0, n, step):
            chunk = imgs.paths[start:start + step]
            pixels = _preprocess(proc, chunk, want)
            if static_batch and len(chunk) < static_batch:  # pad a static-batch model's last batch, drop the pad
                pixels = np.concatenate([pixels, np.repeat(pixels[-1:], static_batch - len(chunk), 0)])
            for key, runner in runners.items():
                out = runner.infer({name: pixels.astype(dtype, copy=False)})
                logits[key].append(next(iter(out.values()))[: len(chunk)])
            done = start + len(chunk)
            if progress and (done == n or (start // step) % every == every - 1):  # about 10 lines in all
                progress(f"eval {done}/{n} images ({time.perf_counter() - t0:.1f} s)")
    pruned, dense = (np.concatenate(logits[k]).reshape(n, -1) for k in ("pruned", "dense"))
    result = {"schema": SCHEMA, "folder": str(folder), "images": str(images), "num_images": n,
              "processor": str(proc_dir), "recipe": report.get("recipe_shorthand"), "model": report.get("model"),
              "backend": backend,
              "agreement_top1": proportion(pruned.argmax(1) == dense.argmax(1))}
    if imgs.labels is not None:
        if int(imgs.labels.max()) >= pruned.shape[1]:
            raise ConfigError(f"{len(imgs.class_names)} class folders in {str(images)!r} but the model has "
                              f"{pruned.shape[1]} outputs; name the folders after the model's id2label labels")
        result |= {"label_mapping": imgs.label_mapping, "classes": imgs.class_names}
        for key, lg in (("pruned", pruned), ("dense", dense)):
            top = np.argsort(-lg, axis=1)[:, :5]
            result[key] = {"top1": proportion(top[:, 0] == imgs.labels),
                           "top5": proportion((top == imgs.labels[:, None]).any(1))}
        result["top1_drop"] = paired_drop(dense.argmax(1) == imgs.labels, pruned.argmax(1) == imgs.labels)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def calibration_batches(images_dir: str | Path, processor_dir: Path, want: tuple[int, ...], *, limit: int = 64,
                        batch: int = 8) -> list[np.ndarray]:
    """int8 calibration batches (pixel_values, at most `limit` images of `images_dir`, `batch` per array) through the
    image processor in `processor_dir`; `want`: the model's (C, H, W), checked per image (one-line ConfigError)."""
    images = scan_images(images_dir).paths[:limit]
    proc = load_processor(processor_dir)
    return [_preprocess(proc, images[i:i + batch], tuple(want)) for i in range(0, len(images), batch)]


def _preprocess(proc, paths: list[Path], want: tuple[int, ...] | None) -> np.ndarray:
    pics = [load_image(p) for p in paths]
    try:
        pixels = np.asarray(proc(images=pics, return_tensors="np")["pixel_values"], np.float32)
    except Exception as e:  # noqa: BLE001 - processors raise ValueError/TypeError on odd images
        raise ConfigError(f"The image processor cannot take {str(paths[0])!r}…: {first_line(e, 120)}") from e
    if want is not None and tuple(pixels.shape[1:]) != want:
        for p, pic in zip(paths, pics):  # name the first offending image
            one = np.asarray(proc(images=[pic], return_tensors="np")["pixel_values"]).shape[1:]
            if tuple(one) != want:
                raise ConfigError(f"Image {str(p)!r} ({pic.width}x{pic.height}) becomes {'x'.join(map(str, one))} "
                                  f"after the image processor, but the model takes {'x'.join(map(str, want))}; resize "
                                  "the images or fix the processor's size in preprocessor_config.json")
    return pixels


def format_result(r: dict) -> str:
    """The table `tokensieve eval` prints."""
    def pct(m: dict) -> str:
        return f"{100 * m['value']:6.2f} %  [{100 * m['ci95'][0]:.2f}, {100 * m['ci95'][1]:.2f}]"

    lines = [f"tokensieve eval: {r['folder']} ({r.get('recipe') or '?'}) on {r['num_images']} images from {r['images']}",
             f"  {'':22s}{'value':>9s}    95 % CI", f"  {'top-1 agreement':22s}{pct(r['agreement_top1'])}"]
    if "pruned" in r:
        for k in ("top1", "top5"):
            lines.append(f"  {'dense ' + k.replace('top', 'top-'):22s}{pct(r['dense'][k])}")
            lines.append(f"  {'pruned ' + k.replace('top', 'top-'):22s}{pct(r['pruned'][k])}")
        d = r["top1_drop"]
        lines.append(f"  {'top-1 drop':22s}{100 * d['value']:6.2f} pp [{100 * d['ci95'][0]:.2f}, {100 * d['ci95'][1]:.2f}]"
                     " (paired bootstrap)")
        lines.append(f"  labels: {len(r['classes'])} class folders, index by {r['label_mapping']}")
    else:
        lines.append("  no class folders: accuracy needs DIR/<class>/*.png")
    lines.append(f"  {r['backend']}, processor {r['processor']}, {r['seconds']:.1f} s")
    return "\n".join(lines)
