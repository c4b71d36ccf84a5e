"""Exporting a (compacted) model for deployment: ``torch.export`` programs and ONNX, each checked.

Each writer exports, writes the file atomically, loads it back and runs it on
the example input, and returns the relative L2 difference from ``model``'s own
output, so a deployment artefact is never shipped unchecked. ONNX needs
``pip install onnx onnxruntime onnxscript`` (``prunekit[export]``).

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    >>> export_program(model, torch.rand(1, 3, 8, 8), "model.pt2") < 1e-6
    True
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor, nn

from prunekit._rollback import eval_mode
from prunekit.io.files import PathLike, atomic_write
from prunekit.measure.error import relative_error

__all__ = ["EXPORT_INSTALL", "export_onnx", "export_program"]

EXPORT_INSTALL = "pip install onnx onnxruntime onnxscript"


def _relative_difference(expected: Tensor, actual: Tensor) -> float:
    if expected.shape != actual.shape:
        raise RuntimeError(f"the exported model returns shape {tuple(actual.shape)}, the model {tuple(expected.shape)}")
    return relative_error(actual.cpu(), expected.cpu())


def _reference(model: nn.Module, example: Tensor) -> Tensor:
    with torch.no_grad(), eval_mode(model):
        output = model(example)
    if not isinstance(output, Tensor):
        raise TypeError(f"export checks models that return one tensor; this one returns {type(output).__name__}")
    return output


def export_program(model: nn.Module, example: Tensor, path: PathLike) -> float:
    """Write ``torch.export.export(model, (example,))`` to ``path`` (``.pt2``); return its difference from ``model``.

    The file is read back with ``torch.export.load`` and run on ``example``.
    """
    expected = _reference(model, example)
    with eval_mode(model):
        program = torch.export.export(model, (example,))
    buffer = io.BytesIO()  # made in memory: a full disk is then an OSError here, not an abort in torch's C++ writer
    torch.export.save(program, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())
    loaded = torch.export.load(str(path))
    with torch.no_grad():
        return _relative_difference(expected, loaded.module()(example))


def export_onnx(model: nn.Module, example: Tensor, path: PathLike) -> float:
    """Write ``model`` as ONNX (torch's dynamo exporter) to ``path``; return onnxruntime's difference from ``model``.

    Raises:
        ImportError: onnx, onnxruntime or onnxscript is missing (the message gives the install command).
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx, onnxruntime and onnxscript ({err}): {EXPORT_INSTALL}") from None
    expected = _reference(model, example)
    with eval_mode(model):
        program: Any = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
    proto = program.model_proto
    if proto.ByteSize() >= 2**31:
        raise ValueError(f"the model is {proto.ByteSize():,} bytes, beyond ONNX's 2 GiB single-file limit")
    with atomic_write(path, "wb") as handle:
        handle.write(proto.SerializeToString())
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    actual = torch.from_numpy(session.run(None, feed)[0])
    return _relative_difference(expected, actual)
