"""SyncCounter: counts the device-to-host syncs a piece of code would make on a GPU, while it runs on CPU.

On CPU nothing ever waits, so the counter follows *where data lives* instead: a tensor is host data when it was
made from Python or numpy without a ``device=`` argument, or by ``.cpu()`` / ``.numpy()``, or computed only from
host data; everything else is device data (made with ``device=``, moved with ``.to(device)``, or computed from
device data). A sync is any operation that needs a device value on the host:

    .cpu() .tolist() .item() .numpy() bool() int() float() on device data      (a copy to the host)
    nonzero, masked_select, unique, bincount, repeat_interleave without output_size, boolean-mask indexing
    of device data                                                              (the output size is data)

Usage: ``with SyncCounter() as s: ...; s.count, s.ops``.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_HOST = "_epserve_host"
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy, torch.Tensor.__bool__,
            torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
_DATA_SIZED = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
               torch.Tensor.unique, torch.unique_consecutive, torch.bincount, torch.Tensor.bincount,
               torch.argwhere, torch.Tensor.argwhere}
_CREATE = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.zeros, torch.ones, torch.full, torch.empty,
           torch.arange, torch.randn, torch.rand}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Declare a tensor made before the counter started to be host data (e.g. the runner's CPU metadata)."""
    setattr(t, _HOST, True)
    return t


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        on_device = [t for t in inputs if not _is_host(t)]
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if on_device and (func in _TO_HOST or func in _DATA_SIZED or self._mask_index(func, args) or
                          (func in (torch.repeat_interleave, torch.Tensor.repeat_interleave)
                           and kwargs.get("output_size") is None and isinstance(args[1] if len(args) > 1 else
                                                                                 kwargs.get("repeats"), torch.Tensor))):
            self.ops.append(name)
        out = func(*args, **kwargs)
        host = (func in (torch.Tensor.cpu, torch.Tensor.numpy)
                or (func in _CREATE and kwargs.get("device") is None and not inputs)
                or (bool(inputs) and not on_device and not self._moves_to_device(func, args, kwargs)))
        if host:
            for t in _tensors(out):
                setattr(t, _HOST, True)
        return out

    @staticmethod
    def _mask_index(func, args) -> bool:
        if func not in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) or len(args) < 2:
            return False
        return any(t.dtype == torch.bool and not _is_host(t) for t in _tensors(args[1]))

    @staticmethod
    def _moves_to_device(func, args, kwargs) -> bool:
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            return any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs
        return "device" in kwargs and kwargs["device"] is not None
