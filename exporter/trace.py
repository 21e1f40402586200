"""Trace a model with torch.export (non-strict), keeping nn_module_stack metadata for the passes."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import nn

from tokensieve.errors import ExportError, first_line


class FirstOutput(nn.Module):
    """Call `model(pixel_values=x)` (HF) or `model(x)` and return its first tensor output, or the outputs named in
    `outputs` (fields of the HF ModelOutput, e.g. ("logits",) or ("image_embeds", "last_hidden_state")): one name
    gives that tensor, several a tuple in their order. `forward_kwargs` go to every HF call, e.g.
    {"interpolate_pos_encoding": True} for an input size other than the config's."""

    def __init__(self, model: nn.Module, input_name: str = "pixel_values", outputs: tuple[str, ...] | None = None,
                 forward_kwargs: dict | None = None):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.outputs = tuple(outputs) if outputs else None
        self.forward_kwargs = dict(forward_kwargs or {})

    def forward(self, pixel_values: torch.Tensor):
        if _is_hf(self.model):
            out = self.model(**{self.input_name: pixel_values}, **self.forward_kwargs)
        else:
            out = self.model(pixel_values)
        if self.outputs is None:
            return first_tensor(out)
        picked = tuple(pick_output(out, name) for name in self.outputs)
        return picked[0] if len(picked) == 1 else picked


def output_fields(out) -> list[str]:
    """The names of a model output's tensors: the fields of a HF ModelOutput (those set), else ["output"]."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    if hasattr(out, "keys"):
        return [k for k in out.keys() if isinstance(out[k], torch.Tensor)]
    return ["output"] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else []


def pick_output(out, name: str) -> torch.Tensor:
    """The output called `name` (output_fields); "output" of a plain tensor or tuple is its first tensor."""
    if hasattr(out, "keys") and name in out.keys():
        return out[name]
    if name == "output":
        return first_tensor(out)
    raise ExportError(f"The model has no output {name!r}; choose from {', '.join(output_fields(out)) or 'none'}")


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ExportError(f"The model returned {type(out).__name__}; tokensieve needs a tensor or a tuple starting with one")


@contextlib.contextmanager
def quiet():
    """Silence torch.export / torch.onnx chatter (progress lines, deprecation warnings)."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.onnx", "torch._export", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def batch_dynamic_shapes(max_batch: int = 64) -> dict:
    return {"pixel_values": {0: torch.export.Dim("batch", min=1, max=max_batch)}}


def trace_batch(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True,
                warn=None) -> tuple[torch.export.ExportedProgram, bool]:
    """trace() with a dynamic batch axis if asked and the model allows it -> (program, whether the batch is dynamic).

    A model whose forward fixes the batch (`len(x)`, Python ints from `x.shape[0]`) cannot be traced with a dynamic
    batch: it is traced again with the example's batch, and `warn(message)` (default: one line on stderr) says so.
    If the static trace fails too, the dynamic trace's error is raised."""
    if not dynamic_batch:
        return trace(module, example, False), False
    try:
        return trace(module, example, True), True
    except ExportError as dynamic_error:
        try:
            ep = trace(module, example, False)
        except ExportError:
            raise dynamic_error from None
    b = int(example.shape[0])
    (warn or _warn)(f"the model fixes its batch (its forward reads the batch size as a Python int, e.g. len(x)), so "
                    f"torch.export cannot make it dynamic: exported for batch {b} only; pass --batch N for another")
    return ep, False


def _warn(message: str) -> None:
    import sys

    print(f"tokensieve: warning: {message}", file=sys.stderr, flush=True)


def trace(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export `module(pixel_values)`; a dynamic batch axis needs an example batch >= 2."""
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        with quiet(), torch.no_grad():
            return torch.export.export(
                module, (example,), dynamic_shapes=batch_dynamic_shapes() if dynamic_batch else None, strict=False
            )
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; report the first line
        raise ExportError(f"torch.export failed: {type(e).__name__}: {first_line(e)}") from e
