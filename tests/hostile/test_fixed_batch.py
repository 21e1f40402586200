"""A model whose forward fixes the batch (`len(x)`, a Python int from x.shape[0]) cannot be traced with a dynamic batch
axis: the export falls back to the example's batch (or `batch=N`, `tokensieve export --batch N`) with one warning
line, verifies at that batch, and a verification at another batch is refused with one line. In-process (the CLI
takes model names and HF folders, not Python modules)."""
from __future__ import annotations

import onnx
import pytest
import torch
from tiny_models import TinyViT

from tokensieve import api
from tokensieve.errors import ConfigError
from tokensieve.exporter.trace import FirstOutput, trace_batch


class FixedBatchViT(TinyViT):
    """TinyViT, written the way some hand-written ViTs are: the batch read as Python ints."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = len(pixel_values)
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0]).reshape(int(pixel_values.shape[0]), -1)


def _model() -> FixedBatchViT:
    torch.manual_seed(0)
    return FixedBatchViT().eval()


def test_the_trace_falls_back_to_the_examples_batch_with_one_line():
    said = []
    ep, dynamic = trace_batch(FirstOutput(_model()), torch.randn(1, 3, 32, 32), warn=said.append)
    assert dynamic is False and len(said) == 1 and "exported for batch 1 only; pass --batch N" in said[0]
    assert tuple(ep.graph_signature.user_inputs) == ("pixel_values",)
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "pixel_values")
    assert tuple(placeholder.meta["val"].shape) == (1, 3, 32, 32)
    # a model that does not fix its batch keeps the dynamic axis, and no warning
    said.clear()
    torch.manual_seed(0)
    _, dynamic = trace_batch(FirstOutput(TinyViT().eval()), torch.randn(1, 3, 32, 32), warn=said.append)
    assert dynamic is True and said == []


def test_export_at_a_chosen_batch_verifies_at_that_batch(tmp_path, capsys):
    result = api.export(_model(), torch.randn(1, 3, 32, 32), "cls-topk@1:0.5", batch=3)
    warning = [line for line in capsys.readouterr().err.splitlines() if "fixes its batch" in line]
    assert len(warning) == 1 and warning[0].startswith("tokensieve: warning: ") and "batch 3" in warning[0]
    assert result.dynamic_batch is False and result.input_shape[0] == 3 and result.summary()["dynamic_batch"] is False
    dim0 = result.onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 3 and not dim0.dim_param
    paths = api.save(result, tmp_path, parts=("debug",))
    assert onnx.load(str(paths["debug"])).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    ver = api.verify(result, paths["debug"], num_inputs=2, batch=3)
    assert ver.passed, ver
    with pytest.raises(ConfigError, match="fixed batch of 3.*pass --batch 3"):
        api.verify(result, paths["debug"], num_inputs=1, batch=1)
    with pytest.raises(ConfigError, match="--batch 0 must be an integer >= 1"):
        api.export(_model(), torch.randn(1, 3, 32, 32), "cls-topk@1:0.5", batch=0)
