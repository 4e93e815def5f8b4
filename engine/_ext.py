"""Loads lenserve._C once and says which of its operators exist for which device."""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("lenserve")


@functools.lru_cache(maxsize=None)
def extension() -> object | None:
    """The compiled extension module, or None when it is missing or LENSERVE_KERNELS=torch."""
    if os.environ.get("LENSERVE_KERNELS", "").lower() == "torch":
        return None
    try:
        from lenserve import _C  # noqa: F401  (registers torch.ops.lenserve.*)
    except ImportError as e:
        logger.warning("lenserve._C is not built (%s); using the pure-torch kernels", e)
        return None
    from lenserve.engine import fake_ops  # noqa: F401  (meta/fake kernels for torch.compile)

    return _C


@functools.lru_cache(maxsize=None)
def has_op(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether torch.ops.lenserve.<name> exists with a kernel for `device` (cached on the pair: it
    is asked before every op call of every layer)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _has_op(name, device_type)


@functools.lru_cache(maxsize=None)
def _has_op(name: str, device_type: str) -> bool:
    ext = extension()
    if ext is None:
        return False
    if device_type == "cuda" and not getattr(ext, "with_cuda", False):
        return False
    key = "CUDA" if device_type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lenserve::{name}", key)
    except RuntimeError:
        return False
