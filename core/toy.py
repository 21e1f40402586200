"""The toy task: procedurally generated images whose label is one small object's shape, and the toy ViT.

A 64x64 image is a dark, noisy, textured background with one small bright object (12-18 px across: it touches 4 to
9 of the 8x8 patches) of a random colour at a random place. The label (5 classes) is the object's shape (square,
disk, triangle, cross, ring): only the patches the object covers carry it, and telling the shapes apart takes the
object's patches together (its outline spans several patches), so the model needs them over several blocks and a
pruning method that drops them early loses the answer, while the object is easy to find (bright on dark) for a
selection rule that looks for it. Everything here is a pure function of a seed (numpy's PCG64), so the training set,
the held-out split and the images `write_image_folder` writes are the same on every machine. A leaf: imports numpy
(torch/transformers lazily) and nothing from tokensieve.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
PATCH_SIZE = 8
SHAPES = ("square", "disk", "triangle", "cross", "ring")
LABELS = SHAPES  # label = index of the object's shape
# the object's colour is drawn from these (bright, so that it stands out from the dark background)
COLOURS = {"red": (235, 40, 40), "orange": (250, 150, 30), "yellow": (240, 235, 40), "lime": (150, 245, 40),
           "green": (40, 210, 60), "cyan": (40, 220, 230), "blue": (70, 110, 255), "purple": (170, 80, 250),
           "magenta": (245, 60, 200), "white": (252, 252, 252)}
# the object's radius in pixels (uniform in this range)
OBJECT_RADIUS = (6.0, 9.0)
# seeds of the splits: training draws batches from TRAIN_SEED + step; the held-out split is one draw from HELDOUT_SEED
TRAIN_SEED = 0
HELDOUT_SEED = 1_000_003

# the toy ViT: small enough that its fp32 safetensors (< 2 MiB) ship inside the package
CONFIG = dict(hidden_size=96, num_hidden_layers=6, num_attention_heads=3, intermediate_size=192,
              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_labels=len(LABELS), hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
MODEL_DIR = Path(__file__).resolve().parent / "toy_vit"  # config.json, model.safetensors, preprocessor_config.json


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 64, 64, 3) uint8 and their labels (n,) int64, a pure function of (n, seed)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = rng.integers(0, len(LABELS), n)
    for i in range(n):
        images[i] = _draw(rng, int(labels[i]))
    return images, labels.astype(np.int64)


def _background(rng: np.random.Generator) -> np.ndarray:
    s = IMAGE_SIZE
    coarse = rng.uniform(15, 75, (4, 4, 1)) + rng.uniform(-10, 10, (4, 4, 3))  # dark, low-saturation blobs
    bg = np.kron(coarse, np.ones((s // 4, s // 4, 1)))
    yy, xx = np.mgrid[0:s, 0:s]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    stripes = 12 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    return bg + stripes[..., None] + rng.normal(0, 10, (s, s, 3))


def _mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    dist = np.hypot(dy, dx)
    if shape == "square":
        return np.maximum(abs(dy), abs(dx)) <= 0.8 * r
    if shape == "disk":
        return dist <= r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= (dy + r) * 0.55)
    if shape == "cross":
        return ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))
    return (dist <= r) & (dist >= 0.55 * r)  # ring


def _draw(rng: np.random.Generator, label: int) -> np.ndarray:
    shape, colour = SHAPES[label], list(COLOURS.values())[rng.integers(len(COLOURS))]
    img = _background(rng)
    r = rng.uniform(*OBJECT_RADIUS)
    cy, cx = rng.uniform(r + 1, IMAGE_SIZE - r - 1, 2)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    m = _mask(shape, yy - cy, xx - cx, r)
    rgb = np.clip(np.asarray(colour, float) + rng.uniform(-15, 15, 3), 0, 255)
    img[m] = rgb + rng.normal(0, 8, (int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- files


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as an 8-bit RGB PNG (zlib + CRC by hand: no Pillow needed)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_image_folder(out: str | Path, n: int, seed: int = HELDOUT_SEED, *, labels: bool = True) -> Path:
    """The held-out split as an ImageFolder: OUT/<label name>/<index>.png (labels=False: OUT/<index>.png)."""
    out = Path(out)
    images, ys = make_images(n, seed)
    for i, (img, y) in enumerate(zip(images, ys)):
        folder = out / LABELS[y] if labels else out
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(png_bytes(img))
    return out


def build_model(seed: int = 0):
    """The toy ViT, randomly initialized from `seed` (HF ViTForImageClassification, [CLS] head, sdpa)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(**CONFIG, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                       attn_implementation="sdpa")
    return ViTForImageClassification(config)


def image_processor():
    """The toy model's processor: rescale 1/255, normalize mean 0.5 / std 0.5, resize to 64x64 (a no-op here)."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def to_pixels(images: np.ndarray):
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 torch tensor, normalized as image_processor() does."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5).contiguous()
