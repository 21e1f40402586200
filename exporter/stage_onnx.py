"""One pruning stage alone as ONNX (the same functions and lowering as in a full export), to time it."""
from __future__ import annotations

import onnx
import torch
from torch import nn

from tokensieve.errors import ExportError
from tokensieve.exporter.onnx_translations import TRANSLATIONS
from tokensieve.exporter.trace import quiet
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.stage import run_stage


class _Stage(nn.Module):
    def __init__(self, method: str, options: dict, keep: int, num_prefix_tokens: int, scale: float | None,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        self.spec, self.options, self.keep, self.p, self.scale = METHODS[method], options, keep, num_prefix_tokens, scale
        self.grid = grid

    def forward(self, q, k, x_in, x_out):
        # The stage as the full export compiles it (capped: adaptive keeps its K slots). A two-block score (HiPrune)
        # reads the same q/k again as its earlier block's: the same cost.
        tokens, _, _ = run_stage(self.spec, self.options, self.keep, self.p, capped=True, q=q, k=k, scale=self.scale,
                                 x_in=x_in, x_out=x_out, q_early=q, k_early=k, scale_early=self.scale, grid=self.grid)
        return tokens


def stage_onnx(method: str, options: dict, keep: int, num_prefix_tokens: int, *, batch: int, tokens: int,
               hidden: int, heads: int,
               grid: tuple[int, int] | None = None) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """ONNX of one stage for (batch, tokens, hidden) inputs with `heads` heads, plus example feeds."""
    d = hidden // heads
    gen = torch.Generator().manual_seed(0)
    feeds = {
        "q": torch.randn(batch, heads, tokens, d, generator=gen),
        "k": torch.randn(batch, heads, tokens, d, generator=gen),
        "x_in": torch.randn(batch, tokens, hidden, generator=gen),
        "x_out": torch.randn(batch, tokens, hidden, generator=gen),
    }
    module = _Stage(method, options, keep, num_prefix_tokens, d ** -0.5, grid)
    try:
        with quiet():
            ep = torch.export.export(module, tuple(feeds.values()), strict=False)
            prog = torch.onnx.export(ep, dynamo=True, opset_version=18, input_names=list(feeds), output_names=["tokens"],
                                     optimize=True, verbose=False, custom_translation_table=TRANSLATIONS)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"Exporting the {method} stage alone failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    model = prog.model_proto
    used = {i.name for i in model.graph.input}
    feeds = {name: t for name, t in feeds.items() if name in used}
    return model, feeds
