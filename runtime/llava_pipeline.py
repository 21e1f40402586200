"""Greedy LLaVA generation from the exported parts on ONNX Runtime or TensorRT (numpy only).

    with LlavaPipeline("out/llava") as pipe:                        # backend="onnxruntime": the three ONNX files
        gen = pipe.generate(input_ids, pixel_values, max_new_tokens=8)   # gen.tokens (B, 8)
    with LlavaPipeline("out/llava", backend="tensorrt") as pipe:   # the engines `export-vlm` built (needs a GPU)
        gen = pipe.generate(input_ids, pixel_values, max_new_tokens=8)

Both backends run the same loop; only the runners differ (OrtRunner on the manifest's "files", TrtRunner on its
"engines", which `tokensieve export-vlm --target ...` / vlm_api.build_vlm record). LlavaOrtPipeline is the same class.

vision_prune.onnx gives K image features per image; the prompt carries exactly K image tokens per row (a static
image-token layout), and their embeddings are replaced by the features in order. lm_prefill.onnx runs the prompt,
lm_decode.onnx one token per step with the flat K/V carried between calls. Positions follow HF generate:
cumsum(attention_mask) - 1 (1 on padding), then +1 per new token.

Inner pruning (manifest "inner": FastV, exporter/vlm/fastv.py): the prefill also takes image_positions (B, N) and
returns keep_idx (B, T'); the decode takes attention_mask_pruned (the mask at keep_idx, then one 1 per new token)
for the layers after the pruning layer, whose caches are shorter. Prompts must be left-padded and end with text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, TargetError
from ..manifest import VlmManifest, read_vlm_manifest
from .base import BaseRunner
from .onnxruntime_runner import OrtRunner

MANIFEST = "llava_parts.json"
PARTS = ("vision", "prefill", "decode")
BACKENDS = ("onnxruntime", "tensorrt")


@dataclass
class Generation:
    tokens: np.ndarray          # (B, steps) int64: the greedily chosen ids
    logits: np.ndarray          # (steps, B, V) float32: the logits each id was chosen from
    keep_idx: np.ndarray        # (B, K) int64: kept patch positions, ascending (batch-1 parts: (K,))
    image_features: np.ndarray  # (B, num_image_tokens, H)
    inner_keep_idx: np.ndarray | None = None  # FastV: (B, R) kept image tokens (ordinals among the image tokens)
    inner_prompt_keep_idx: np.ndarray | None = None  # FastV: (B, T') prompt positions its prefill kept


def part_runners(out_dir: str | Path, manifest: VlmManifest, backend: str = "onnxruntime", *,
                 threads: int | None = None, manifest_name: str = MANIFEST) -> dict[str, BaseRunner]:
    """{part: runner} for vision / prefill / decode of an export folder: OrtRunner on the ONNX files (their
    external data, if any, next to them), or TrtRunner on the engines the manifest lists under "engines". A folder
    without engines is a one-line TargetError naming the command that builds them."""
    out_dir = Path(out_dir)
    if backend == "onnxruntime":
        return {k: OrtRunner(out_dir / manifest.files[k], threads=threads) for k in PARTS}
    if backend != "tensorrt":
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if threads is not None:
        raise ConfigError("threads is an ONNX Runtime option; drop it with backend='tensorrt'")
    from .tensorrt_runner import TrtRunner

    engines = manifest.engines
    fix = (f"build them with `tokensieve export-vlm MODEL -o {out_dir} --target rtx-smXX` (TensorRT-RTX, e.g. "
           "rtx-sm86; `--target local` on the GPU with standard TensorRT)")
    missing = [k for k in PARTS if not isinstance(engines.get(k), dict) or "file" not in engines[k]]
    if missing:
        onnx = manifest.files.get(missing[0], missing[0])
        raise TargetError(f"{str(out_dir / manifest_name)!r} lists no TensorRT engine for {onnx}; {fix}")
    runners = {}
    for k in PARTS:
        path = out_dir / engines[k]["file"]
        if not path.is_file():
            target = engines[k].get("target", "rtx-smXX")
            raise TargetError(f"TensorRT engine {str(path)!r} listed in {manifest_name} does not exist; rebuild it "
                              f"with `tokensieve export-vlm MODEL -o {out_dir} --target {target}`")
        runners[k] = TrtRunner(path)
    return runners


class LlavaPipeline:
    """Greedy LLaVA decoding over the three parts of an export folder on `backend` ("onnxruntime" or "tensorrt")."""

    def __init__(self, out_dir: str | Path, *, backend: str = "onnxruntime", threads: int | None = None,
                 manifest_name: str = MANIFEST):  # another 1-D-position family's manifest (InternVL: manifest.json)
        self.out_dir = Path(out_dir)
        self.manifest = m = read_vlm_manifest(self.out_dir, manifest_name)
        self.backend = backend
        runners = part_runners(self.out_dir, m, backend, threads=threads, manifest_name=manifest_name)
        self.vision, self.prefill, self.decode = (runners[k] for k in PARTS)
        self.embed_tokens = np.load(self.out_dir / m.files["embed"])
        self.num_image_tokens, self.image_token_id = m.num_image_tokens, m.placeholder_token_id
        self.num_layers = m.num_text_layers
        self.inner = m.inner

    def __enter__(self) -> "LlavaPipeline":
        try:
            for r in (self.vision, self.prefill, self.decode):
                r.activate()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for r in (self.vision, self.prefill, self.decode):
            r.deactivate()

    def image_features(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 -> image features (B, num_image_tokens, H_lm), keep_idx (B, K)."""
        out = self.vision.infer({"pixel_values": np.asarray(pixel_values, dtype=np.float32)})
        return out["image_features"], out["keep_idx"]

    def embed_prompt(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        """Token embeddings of `input_ids` (B, T) with row b's image tokens replaced, in order, by image_features[b]."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ConfigError(f"input_ids must be a 2-D integer array (B, T), got {ids.dtype} {ids.shape}")
        vocab = self.embed_tokens.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"input_ids hold ids outside the vocabulary 0..{vocab - 1}")
        if image_features.shape[0] != ids.shape[0]:
            raise ConfigError(f"{ids.shape[0]} prompts but {image_features.shape[0]} images; give one image per prompt")
        is_image = ids == self.image_token_id
        counts = is_image.sum(axis=1)
        if (counts != self.num_image_tokens).any():
            b = int(np.argmax(counts != self.num_image_tokens))
            raise ConfigError(f"prompt {b} has {int(counts[b])} image tokens (id {self.image_token_id}); this export "
                              f"needs exactly {self.num_image_tokens} per prompt (the kept K)")
        embeds = self.embed_tokens[ids].astype(np.float32)
        embeds[is_image] = image_features.reshape(-1, image_features.shape[-1])  # row-major: row b's tokens in order
        return embeds

    def generate(self, input_ids: np.ndarray, pixel_values: np.ndarray, max_new_tokens: int = 8,
                 attention_mask: np.ndarray | None = None) -> Generation:
        """Greedy decoding of `max_new_tokens` ids after the prompt."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        ids = np.asarray(input_ids, dtype=np.int64)
        features, keep_idx = self.image_features(pixel_values)
        embeds = self.embed_prompt(ids, features)
        mask = np.ones(ids.shape, dtype=np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask {mask.shape} must have the shape of input_ids {ids.shape}")
        position_ids = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1).astype(np.int64)
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
        if self.inner:
            feeds["image_positions"] = self._image_positions(ids, mask)
        out = first = self.prefill.infer(feeds)
        pruned = np.take_along_axis(mask, out["keep_idx"], axis=1) if self.inner else None
        tokens, logits = [], []
        position = position_ids[:, -1:]
        for step in range(max_new_tokens):
            step_logits = out["logits"]
            token = step_logits.argmax(axis=-1).astype(np.int64)[:, None]
            tokens.append(token)
            logits.append(step_logits)
            if step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            position = position + 1
            past = {f"past.{i}.{kind}": out[f"present.{i}.{kind}"]
                    for i in range(self.num_layers) for kind in ("key", "value")}
            if pruned is not None:
                pruned = np.concatenate([pruned, np.ones_like(token)], axis=1)
                past["attention_mask_pruned"] = pruned
            out = self.decode.infer({"input_ids": token, "attention_mask": mask, "position_ids": position, **past})
        inner_keep, prompt_keep = (first["image_keep_idx"], first["keep_idx"]) if self.inner else (None, None)
        return Generation(np.concatenate(tokens, axis=1), np.stack(logits), keep_idx, features, inner_keep,
                          prompt_keep)

    def _image_positions(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, N) sequence indices of the image tokens (embed_prompt checked there are N per row)."""
        if (ids[:, -1] == self.image_token_id).any() or (mask[:, -1] == 0).any():
            raise ConfigError("FastV scores the image tokens with the last prompt position: every prompt must end "
                              "with a text token and be left-padded")
        return np.nonzero(ids == self.image_token_id)[1].reshape(ids.shape[0], -1).astype(np.int64)


LlavaOrtPipeline = LlavaPipeline  # the name the ONNX Runtime-only pipeline had; backend="onnxruntime" is the default
