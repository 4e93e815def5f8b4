"""Weights kept in their GGUF encoding: the raw bytes of each row plus the ggml type.

lenserve._C's `quant_linear` and `quant_embedding` read these rows directly (csrc/cpu/quant_*.cpp);
nothing is dequantized at load. Row operations (llama.cpp's Q/K rope permutation, fusing q/k/v or
gate/up) move whole rows, so they work on the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # numpy only where a GGUF is read: the engine path imports without it
    import numpy as np

# ggml types the kernels read as they are (gguf.GGMLQuantizationType values).
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 13, 14, 30
KERNEL_TYPES = {F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K}
_BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}


def row_bytes(weight_type: int, in_features: int) -> int:
    elems, nbytes = _BLOCK[weight_type]
    if in_features % elems:
        raise ValueError(f"{in_features} features is not a multiple of the type's block of {elems}")
    return in_features // elems * nbytes


@dataclass
class QuantWeight:
    """A matrix [out_features, in_features] as uint8 rows [out_features, row_bytes] of `weight_type`."""

    data: torch.Tensor  # uint8 [out_features, row_bytes]
    weight_type: int
    in_features: int

    def __post_init__(self) -> None:
        want = (self.data.shape[0], row_bytes(self.weight_type, self.in_features))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(f"quantized rows must be uint8 {want}, got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.weight_type).name

    @classmethod
    def from_float16(cls, w: torch.Tensor) -> "QuantWeight":
        h = w.to(torch.float16).contiguous()
        return cls(h.view(torch.uint8).reshape(h.shape[0], -1), F16, h.shape[1])

    @classmethod
    def from_float32(cls, w: torch.Tensor) -> "QuantWeight":
        f = w.to(torch.float32).contiguous()
        return cls(f.view(torch.uint8).reshape(f.shape[0], -1), F32, f.shape[1])

    @classmethod
    def cat(cls, parts: list["QuantWeight"]) -> "QuantWeight":
        assert len({p.weight_type for p in parts}) == 1 and len({p.in_features for p in parts}) == 1
        return cls(torch.cat([p.data for p in parts]), parts[0].weight_type, parts[0].in_features)

    def rows(self, index: np.ndarray) -> "QuantWeight":
        return QuantWeight(self.data[torch.from_numpy(index)].contiguous(), self.weight_type, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 [out_features, in_features] through gguf's own dequantize (the reference)."""
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(self.data.numpy(), self.weight_type)).float().reshape(self.shape)

    @property
    def num_bytes(self) -> int:
        return self.data.numel()
