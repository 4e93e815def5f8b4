"""The step's metadata in one host buffer, sent to the device in one copy.

A step needs about eight small integer tensors (token ids, positions, slots, cu_seqlens, block
tables, ...). Eight `torch.tensor(..., device="cuda")` calls are eight synchronous host-to-device
copies; here they are written into one pinned host buffer at 8-byte aligned offsets, copied once
with non_blocking=True, and handed out as views of one device buffer. On CPU the host buffer is
the result (nothing is copied).
"""
from __future__ import annotations

import math

import torch

_ALIGN = 8  # bytes: every field starts where an int64 may


def pack_layout(fields: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[dict[str, tuple[int, torch.dtype, tuple[int, ...]]], int]:
    """Byte offset of each (name, dtype, shape) field in one buffer, and the buffer's size."""
    layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
    offset = 0
    for name, dtype, shape in fields:
        if name in layout:
            raise ValueError(f"field {name!r} appears twice")
        layout[name] = (offset, dtype, shape)
        nbytes = math.prod(shape) * dtype.itemsize
        offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return layout, offset


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buf[offset : offset + nbytes].view(dtype).view(shape)


class StepBuffer:
    """Stages a step's integer metadata for `device`: `stage` takes (name, dtype, shape, values)
    with values a flat Python list or a CPU tensor, and returns {name: tensor on device}."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._host: torch.Tensor | None = None  # pinned, reused on CUDA
        self._device: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # the last copy out of _host
        self.num_copies = 0  # host-to-device copies issued (one a step)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if not self.on_cuda:
            # A fresh buffer each step: what it holds may outlive the step (a caller keeping the metadata).
            return torch.empty(nbytes, dtype=torch.uint8)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the buffer (long done in practice)
        if self._host is None or self._host.numel() < nbytes:
            self._host = torch.empty(max(nbytes, 2 * (self._host.numel() if self._host is not None else 0)), dtype=torch.uint8, pin_memory=True)
        return self._host

    def stage(self, fields: list[tuple[str, torch.dtype, tuple[int, ...], list | torch.Tensor]]) -> dict[str, torch.Tensor]:
        layout, nbytes = pack_layout([(n, d, s) for n, d, s, _ in fields])
        host = self._host_buffer(nbytes)
        for name, dtype, shape, values in fields:
            if math.prod(shape) == 0:
                continue
            src = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
            _view(host, *layout[name]).copy_(src.view(shape))
        if self.on_cuda:
            if self._device is None or self._device.numel() < nbytes:
                self._device = torch.empty(max(nbytes, 2 * (self._device.numel() if self._device is not None else 0)), dtype=torch.uint8, device=self.device)
            dev = self._device
            dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
            self.num_copies += 1
        else:
            dev = host
        return {name: _view(dev, *layout[name]) for name, *_ in fields}
