"""Counting the points where the host waits for the device.

A decode that reads a device value into Python (``bool``, ``int``,
``.item()``), copies a tensor from an accelerator to the host, or runs an
op whose output size depends on the data (``nonzero``, ``masked_select``)
stalls the host until the device has caught up: each such point splits a
CUDA graph and idles the GPU. :class:`HostSyncCounter` counts them by
watching every operator call, so it counts the same points on the CPU,
where they cost nothing, as on a GPU.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS_TO_HOST = ("aten._local_scalar_dense",)           # bool(t), int(t), t.item()
DATA_DEPENDENT_SHAPES = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2")


def _is_device_to_host(func, args, kwargs) -> bool:
    name = func.name()
    if name.startswith("aten::_to_copy") or name.startswith("aten::to"):
        source, target = args[0], kwargs.get("device")
        return (isinstance(source, torch.Tensor) and source.device.type != "cpu"
                and target is not None and torch.device(target).type == "cpu")
    if name.startswith("aten::copy_"):
        target, source = args[0], args[1]
        return target.device.type == "cpu" and source.device.type != "cpu"
    return False


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...``; then ``syncs.total`` and ``syncs.by_op``."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = str(func.overloadpacket)
        if packet in READS_TO_HOST or packet in DATA_DEPENDENT_SHAPES:
            self.by_op[packet] += 1
        elif _is_device_to_host(func, args, kwargs):
            self.by_op["device_to_host_copy"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())
