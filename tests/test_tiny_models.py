"""Each tiny model factory builds, is deterministic and runs forward on its declared input."""

from __future__ import annotations

import pytest
import torch

try:
    from tiny_models import TINY_MODEL_INFO, TINY_MODELS
except ImportError:  # tests/ imported as a package
    from tests.tiny_models import TINY_MODEL_INFO, TINY_MODELS


def _first_output(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def test_info_covers_every_model():
    assert set(TINY_MODEL_INFO) == set(TINY_MODELS)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_factory_builds_and_runs(name):
    model, shape = TINY_MODELS[name]()
    info = TINY_MODEL_INFO[name]
    assert not model.training
    assert len(shape) == 4 and shape[1] == 3
    if hasattr(model, "config"):
        assert model.config._attn_implementation == "sdpa"
    blocks = [m for m in model.modules() if type(m).__name__ == info.block_class]
    assert len(blocks) == info.num_blocks

    x = torch.randn(shape)
    with torch.no_grad():
        out = _first_output(model(pixel_values=x))
    assert out.shape[0] == shape[0]
    assert torch.isfinite(out).all()
    if out.dim() == 3:  # last_hidden_state: [B, prefix + patches, D]
        assert out.shape[1] == info.seq_len


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_factory_is_deterministic(name):
    a, shape = TINY_MODELS[name]()
    b, _ = TINY_MODELS[name]()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
