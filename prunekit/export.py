"""Exporting a (compacted) model for deployment: ``torch.export`` programs and ONNX, each checked; 2:4 weights for sparse tensor cores.

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

__all__ = ["EXPORT_INSTALL", "export_onnx", "export_program", "semi_structured_layers", "to_semi_structured"]

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


def semi_structured_layers(model: nn.Module) -> list:
    """The names of ``model``'s ``nn.Linear`` layers whose weights hold a 2:4 pattern (two zeros in every four inputs).

    Example:
        >>> linear = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 4.0, 0.0]]))
        >>> semi_structured_layers(torch.nn.Sequential(linear))
        ['0']
    """
    from prunekit.methods.semi_structured import is_semi_structured

    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and is_semi_structured(module.weight)]


def to_semi_structured(model: nn.Module, layers: Any = None) -> nn.Module:
    """Convert the 2:4 weights of ``model``'s Linear layers in place to ``torch.sparse.to_sparse_semi_structured``.

    What a 2:4 plan (``--method 2:4``) buys: on a CUDA GPU with sparse tensor cores (Ampere or
    later) the converted layers' matmuls skip the zeros (fp16/bf16; the speed-up grows with the
    layer's size, none for small layers). The model must be finalized (:func:`prunekit.finalize`),
    on CUDA, in float16 or bfloat16. ``layers``: the names to convert (default: every Linear whose
    weight is 2:4, :func:`semi_structured_layers`). Returns ``model``.

    Raises:
        ValueError: the model still holds pruning masks, a named layer is not 2:4, a weight is
            not on CUDA in fp16/bf16, or its shape is one the kernels do not take (torch's message).
    """
    from torch.nn.utils import prune

    if prune.is_pruned(model):
        raise ValueError("the model still holds pruning masks; make them permanent first: prunekit.finalize(model)")
    names = semi_structured_layers(model) if layers is None else list(layers)
    if not names:
        raise ValueError("no Linear layer of the model holds a 2:4 pattern; prune it with --method 2:4 first")
    found = set(semi_structured_layers(model))
    wrong = [name for name in names if name not in found]
    if wrong:
        raise ValueError(f"{wrong} do not hold a 2:4 pattern (two zeros in every four inputs); leave them out")
    for name in names:
        weight = model.get_submodule(name).weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"layer {name!r} is {weight.dtype} on {weight.device}: 2:4 kernels run on CUDA in "
                             "float16 or bfloat16; model.half().cuda() first")
    for name in names:
        module = model.get_submodule(name)
        try:
            sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach())
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"layer {name!r} ({tuple(module.weight.shape)}): {err}") from None
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return model
