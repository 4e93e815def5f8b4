"""The step's metadata in one host buffer, sent to the device in one copy.

A step needs about eight small integer tensors (token ids, positions, slots, cu_seqlens, block
tables, ...). Eight `torch.tensor(..., device="cuda")` calls are eight synchronous host-to-device
copies; here they are written into one pinned host buffer at 8-byte aligned offsets, copied once
with non_blocking=True, and handed out as views of one device buffer. On CPU each field is made
directly as a tensor of its own (there is no copy to save).
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


def _fresh_tensors(fields: list[tuple[str, torch.dtype, tuple[int, ...], list | torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The fields as new tensors, with nothing to copy them to: the list fields of one dtype
    become one tensor (one torch.tensor call) split into views, a tensor field is copied, so no
    result aliases what the caller may reuse. Writing every field into one buffer first, as the
    CUDA path must, cost a copy and two views per field: a batch-1 decode step's largest Python
    cost outside the model after the cost model's."""
    out: dict[str, torch.Tensor] = {}
    lists: dict[torch.dtype, list[tuple[str, tuple[int, ...], list]]] = {}
    for name, dtype, shape, values in fields:
        if isinstance(values, torch.Tensor):
            out[name] = values.to(dtype=dtype, copy=True).view(shape)
        else:
            lists.setdefault(dtype, []).append((name, shape, values))
    for dtype, group in lists.items():
        flat = torch.tensor([v for _, _, values in group for v in values], dtype=dtype)
        for (name, shape, _), part in zip(group, flat.split([len(values) for _, _, values in group])):
            out[name] = part.view(shape)
    return {name: out[name] for name, *_ in fields}


class StepBuffer:
    """Stages a step's integer metadata for `device`: `stage` takes (name, dtype, shape, values)
    with values a flat Python list or a CPU tensor, and returns {name: tensor on device}."""

    def __init__(self, device: torch.device, pack: bool | None = None) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        # one buffer for every field (always on CUDA; on CPU only when asked, as the tests of the layout do)
        self.pack = self.on_cuda if pack is None else pack
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
        if not self.pack:
            return _fresh_tensors(fields)
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
