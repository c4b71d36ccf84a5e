"""The guard of a model under measurement: whatever a scan or a plan's score changes, it puts back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> guard = ModelGuard(model)
    >>> with guard.swap([(model, "weight")], [torch.zeros(2, 2)]):
    ...     bool((model.weight == 0).all())
    True
    >>> guard.restore(); bool((model.weight != 0).any())
    True
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from prunekit._rollback import restore_training, training_flags
from prunekit.methods.base import Target

__all__ = ["ModelGuard"]


class ModelGuard:
    """Records what the scan may change and puts it back: swapped data, train flags, buffers, grads.

    Buffers come back as the same objects with the same values (an ``evaluate``
    that reassigns one is undone), grads by value (one that calls ``backward()``
    is undone), and :meth:`restore` runs to its end even when Ctrl-C lands inside it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = training_flags(model)
        # BatchNorm in train mode would update its running statistics; the scan
        # runs in eval mode, and this copy undoes an evaluate() that trains anyway.
        self.buffers = [
            (module, name, buffer, buffer.detach().clone())
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        self.grads = [
            (param, param.grad, None if param.grad is None else param.grad.detach().clone())
            for param in model.parameters()
        ]
        self.swapped: Dict[int, Tuple[nn.Parameter, Tensor]] = {}

    @contextlib.contextmanager
    def swap(self, targets: Sequence[Target], data: Sequence[Tensor]) -> Iterator[None]:
        """Give each target parameter the data in ``data`` for the duration of the block."""
        try:
            for (module, name), new in zip(targets, data):
                param = module._parameters[name]
                assert param is not None
                if id(param) not in self.swapped:
                    self.swapped[id(param)] = (param, param.data)
                param.data = new
            yield
        finally:
            self.unswap()

    def unswap(self) -> None:
        # Idempotent, so the outer restore can finish an inner one cut short by Ctrl-C.
        while self.swapped:
            key = next(iter(self.swapped))
            param, original = self.swapped[key]
            param.data = original
            del self.swapped[key]

    def _restore_buffers(self) -> None:
        for module, name, buffer, saved in self.buffers:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
            if not torch.equal(buffer, saved):
                with torch.no_grad():
                    buffer.copy_(saved)

    def reset_point(self) -> None:
        """Undo what evaluate() may have changed besides the weights: buffers and train/eval mode."""
        self._restore_buffers()
        self.model.eval()

    def _restore_once(self) -> None:
        self.unswap()
        self._restore_buffers()
        restore_training(self.training)
        for param, grad, saved in self.grads:
            if grad is not None and saved is not None:
                with torch.no_grad():
                    grad.copy_(saved)
            param.grad = grad

    def restore(self) -> None:
        """Put everything back; every step is idempotent, so an interrupt inside just starts it again."""
        interrupted: Optional[BaseException] = None
        while True:
            try:
                self._restore_once()
                break
            except KeyboardInterrupt as err:  # Ctrl-C during the cleanup: finish it, then re-raise
                interrupted = err
        if interrupted is not None:
            raise interrupted
