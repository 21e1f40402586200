"""tokensieve.manifest: the one VLM export-folder manifest schema, written and read back without fallbacks."""
from __future__ import annotations

import json

import pytest

from tokensieve.errors import ConfigError
from tokensieve.manifest import (VLM_MANIFEST_VERSION, VlmManifest, find_vlm_manifest, read_vlm_manifest,
                                 write_vlm_manifest)


def _manifest(**changes) -> VlmManifest:
    fields = dict(version=VLM_MANIFEST_VERSION, model_type="qwen2_vl", modality="video", grid_thw=[3, 4, 4],
                  prune="attn-mean:6", method="attn-mean", options={"mean_attention": True}, keep=6, image_tokens=12,
                  num_image_tokens=6, placeholder_token_id=201, num_text_layers=2, layout={"t": 3},
                  files={"vision": "vision_prune.onnx"}, sizes={"vision": 10}, seconds={"vision": 0.5},
                  vision_ops={"TopK": 2}, prefill_ops={"MatMul": 4})
    return VlmManifest(**(fields | changes))


def _one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_round_trip_and_optional_fields(tmp_path):
    m = _manifest()
    path = write_vlm_manifest(tmp_path / "manifest.json", m)
    data = json.loads(path.read_text())
    assert data["version"] == VLM_MANIFEST_VERSION and "inner" not in data and "engines" not in data
    assert read_vlm_manifest(tmp_path) == m and find_vlm_manifest(tmp_path) == path
    full = _manifest(inner={"method": "fastv", "keep": 3}, engines={"vision": {"file": "vision_prune.engine"}})
    write_vlm_manifest(tmp_path / "manifest.json", full)
    assert read_vlm_manifest(tmp_path, "manifest.json") == full


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("version"), "has no version"),
    (lambda d: d.update(version=VLM_MANIFEST_VERSION + 1), f"is version {VLM_MANIFEST_VERSION + 1}"),
    (lambda d: d.pop("keep"), "lacks keep"),
    (lambda d: d.update(recipe="cls-topk:4"), "unknown field(s) recipe"),
])
def test_older_or_broken_manifests_are_refused_in_one_line(tmp_path, edit, words):
    data = _manifest().to_dict()
    edit(data)
    (tmp_path / "llava_parts.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        read_vlm_manifest(tmp_path)
    assert words in _one_line(e) and "re-export" in str(e.value)


def test_missing_or_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="holds no VLM manifest") as e:
        read_vlm_manifest(tmp_path)
    _one_line(e)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="Cannot read") as e:
        read_vlm_manifest(tmp_path)
    _one_line(e)
