"""The one manifest schema of a VLM export folder (`tokensieve export-vlm` / vlm_api.export_vlm), every family.

    write_vlm_manifest(out_dir / "manifest.json", VlmManifest(...))      # atomically
    m = read_vlm_manifest(out_dir)                                        # whichever family's file is there

The file is named by the family (LLaVA: llava_parts.json, Qwen2-VL: manifest.json; VLM_MANIFEST_NAMES), the content
is this one frozen dataclass with a `version`. It is read without fallbacks: every field is required (but `inner`,
None without inner pruning, and `engines`, empty until engines are built); a manifest without `version` (written
before this schema) or of another version is refused with one line saying to re-export the folder.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tokensieve.errors import ConfigError
from tokensieve.fileio import write_json_atomic
from tokensieve.trust import check_manifest_files

VLM_MANIFEST_VERSION = 1
VLM_MANIFEST_NAMES = ("llava_parts.json", "manifest.json")  # LLaVA, Qwen2-VL
PARTS = ("vision", "prefill", "decode")


@dataclass(frozen=True)
class VlmManifest:
    """What an export folder holds and what its pipeline needs to run the parts."""

    version: int
    model_type: str                 # the family ("llava", "qwen2_vl")
    modality: str                   # "image" | "video"
    grid_thw: list[int] | None      # the static grid (t, h, w) in patches; None: the family's fixed image size
    prune: str                      # the outer stage written back in full (cls-topk@1:4, attn-mean:6)
    method: str
    options: dict
    keep: int                       # K: image tokens the outer stage keeps
    image_tokens: int               # what it keeps them from (LLaVA: patches; Qwen2-VL: merged image / video tokens)
    num_image_tokens: int           # image tokens a prompt carries (K; LLaVA 'full': K + 1)
    placeholder_token_id: int       # the prompt's image (video) token
    num_text_layers: int
    layout: dict                    # the family's layout, as its dataclass fields
    files: dict[str, str]           # part (and extra file) -> file name in the folder
    sizes: dict[str, int]
    seconds: dict[str, float]
    vision_ops: dict[str, int]
    prefill_ops: dict[str, int]
    inner: dict | None = None       # inner pruning (FastvSpec.to_dict()), None without
    engines: dict[str, dict] = field(default_factory=dict)  # part -> engine entry (vlm_api.build_vlm)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["inner"] is None:
            del out["inner"]
        if not out["engines"]:
            del out["engines"]
        return out


_REQUIRED = [f.name for f in fields(VlmManifest) if f.name not in ("inner", "engines")]


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object in `path` (an export's report or manifest); a one-line ConfigError ending in `fix` if it cannot
    be read or decoded, or holds something other than an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"Cannot read {str(path)!r} ({type(e).__name__}); {fix}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} is not {what} (a JSON object); {fix}")
    return data


def write_vlm_manifest(path: str | Path, manifest: VlmManifest) -> Path:
    """Write `manifest` as JSON at `path`, atomically."""
    return write_json_atomic(Path(path), manifest.to_dict())


def find_vlm_manifest(folder: str | Path) -> Path | None:
    """The VLM manifest file in `folder` (one of VLM_MANIFEST_NAMES), or None."""
    return next((Path(folder) / n for n in VLM_MANIFEST_NAMES if (Path(folder) / n).is_file()), None)


def read_vlm_manifest(folder: str | Path, name: str | None = None) -> VlmManifest:
    """The manifest of an export folder (`name`, or whichever of VLM_MANIFEST_NAMES is there); one-line ConfigError
    for a missing, unreadable, version-less / other-version or incomplete one."""
    folder = Path(folder)
    path = folder / name if name is not None else find_vlm_manifest(folder)
    if path is None:
        raise ConfigError(f"{str(folder)!r} holds no VLM manifest ({' / '.join(VLM_MANIFEST_NAMES)}); pass the folder "
                          "export_vlm (tokensieve export-vlm) wrote")
    data = read_json_object(path, "a VLM manifest", "pass the folder export_vlm wrote, or re-export it")
    version = data.get("version")
    if version != VLM_MANIFEST_VERSION:
        what = "has no version (written by an older tokensieve)" if version is None else f"is version {version!r}"
        raise ConfigError(f"{str(path)!r} {what}; this tokensieve reads VLM manifest version {VLM_MANIFEST_VERSION}: "
                          "re-export the folder with `tokensieve export-vlm`")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{str(path)!r} lacks {', '.join(missing)}; re-export the folder with "
                          "`tokensieve export-vlm`")
    unknown = sorted(set(data) - {f.name for f in fields(VlmManifest)})
    if unknown:
        raise ConfigError(f"{str(path)!r} has unknown field(s) {', '.join(unknown)}; re-export the folder with this "
                          "tokensieve")
    check_manifest_files(folder, data["files"], data.get("engines"), path.name, "re-export it with `tokensieve export-vlm`")
    return VlmManifest(**data)
