"""runtime/engine_metadata.py: the one schema (version 2 written, version 1 read with documented defaults)."""
from __future__ import annotations

import json

import pytest

from tokensieve.errors import InternalError, TargetError
from tokensieve.runtime import engine_metadata as em


def _v2(**changes) -> dict:
    fields = {k: None for k in em.FIELDS[1:]} | {"flavor": "tensorrt_rtx", "tensorrt_version": "1.7"}
    return em.engine_metadata({"tokensieve": {"dense": True}}, **fields) | changes


def test_writer_refuses_missing_unknown_and_clashing_keys():
    doc = _v2()
    assert doc["schema"] == em.SCHEMA == "tokensieve.tensorrt-engine/2" and list(doc)[: len(em.FIELDS)] == list(em.FIELDS)
    fields = {k: None for k in em.FIELDS[1:]}
    with pytest.raises(InternalError, match=r"missing keys \['precision'\]"):
        em.engine_metadata(**{k: v for k, v in fields.items() if k != "precision"})
    with pytest.raises(InternalError, match=r"unknown keys \['precison'\]"):
        em.engine_metadata(**fields, precison="fp16")
    with pytest.raises(InternalError, match="collide"):
        em.engine_metadata({"plugins": []}, **fields)


def test_version_1_gets_the_documented_defaults(tmp_path):
    engine = tmp_path / "m.engine"
    v1 = {"schema": "tokensieve.tensorrt-engine/1", "flavor": "tensorrt", "tensorrt_version": "10.3",
          "engine_size_bytes": 4}
    em.metadata_path_for(engine).write_text(json.dumps(v1))
    meta = em.read_engine_metadata(engine)
    assert set(em.FIELDS) <= set(meta) and meta["engine_size_bytes"] == 4
    assert {k: meta[k] for k in em.V1_DEFAULTS if k not in v1} == {k: v for k, v in em.V1_DEFAULTS.items() if k not in v1}


@pytest.mark.parametrize("doc, match", [
    ({"schema": "tokensieve.tensorrt-engine/3", "flavor": "x", "tensorrt_version": "1"}, "schema version 3"),
    ({"schema": "tokensieve.tensorrt-engine/2", "flavor": "x", "tensorrt_version": "1"}, "lacks tokensieve_version"),
    ({"schema": "other/1", "flavor": "x", "tensorrt_version": "1"}, "is not tokensieve engine metadata"),
    (["not", "a", "dict"], "is not tokensieve engine metadata"),
])
def test_unreadable_versions_are_one_line(tmp_path, doc, match):
    engine = tmp_path / "m.engine"
    em.metadata_path_for(engine).write_text(json.dumps(doc))
    with pytest.raises(TargetError, match=match) as e:
        em.read_engine_metadata(engine)
    assert "\n" not in str(e.value) and "tokensieve build" in str(e.value)


def test_version_2_round_trips(tmp_path):
    engine = tmp_path / "m.engine"
    em.metadata_path_for(engine).write_text(json.dumps(_v2()))
    assert em.read_engine_metadata(engine) == _v2()
