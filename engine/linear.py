"""Linear layers. On CPU in fp32 the weights are prepacked once: into lenserve._C's 16-row panels
(`packed_linear`, an AVX2 micro-kernel that streams a panel front to back, so decode reads the
weights near memory bandwidth), or for oneDNN through torch's mkldnn ops when the extension is
absent. Both beat the default BLAS path, which reaches about half the bandwidth on the skinny
matrices of decode (benchmarks/bench_linear.py). Elsewhere this is F.linear.

QuantLinear runs weights kept in their GGUF encoding (engine/quant.py) through lenserve._C's
`quant_linear`.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from lenserve.engine._ext import has_op
from lenserve.engine.quant import QuantWeight

logger = logging.getLogger("lenserve")

# oneDNN packs for an expected batch; 32 rows served batch 1 to 256 best in measurements here.
_PACK_BATCH_HINT = 32


def _mkldnn_linear_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = True) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = False
        self.lenserve_packed = False
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        if prepack and cpu_fp32 and os.environ.get("LENSERVE_LINEAR") != "onednn" and has_op("packed_linear"):
            self.weight = torch.ops.lenserve.pack_linear_weight(weight)
            self.lenserve_packed = True
            return
        if prepack and cpu_fp32 and _mkldnn_linear_available():
            try:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
                self.packed = True
                return
            except RuntimeError as e:
                logger.warning("oneDNN weight prepacking failed (%s); using F.linear", e)
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.lenserve_packed:
            if x.dim() == 2:
                if x.stride(1) != 1:
                    x = x.contiguous()
                return torch.ops.lenserve.packed_linear(x, self.weight, self.out_features, self.bias)
            y = torch.ops.lenserve.packed_linear(x.reshape(-1, self.in_features), self.weight, self.out_features, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    @property
    def num_bytes(self) -> int:
        if self.lenserve_packed:
            n = self.weight.numel() * 4  # rows padded to a multiple of 16
        elif self.packed:
            n = self.out_features * self.in_features * 4
        else:
            n = self.weight.numel() * self.weight.element_size()
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)


class QuantLinear:
    """y = x Wᵀ + b over GGUF-encoded rows. A fused projection whose parts differ in type (a
    Q4_K_M file stores attn_v as Q6_K beside Q4_K q and k) runs one op per part."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None = None) -> None:
        merged: list[QuantWeight] = []
        for p in parts:
            if merged and merged[-1].weight_type == p.weight_type:
                merged[-1] = QuantWeight.cat([merged[-1], p])
            else:
                merged.append(p)
        for p in merged:
            if p.can_interleave():
                p.interleave()  # a tied embedding shares this QuantWeight, and so its layout
        self.parts = merged
        self.in_features = parts[0].in_features
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if len(self.parts) == 1:
            p = self.parts[0]
            y = torch.ops.lenserve.quant_linear(x2, p.data, p.weight_type, p.shape[0], self.bias)
        else:
            y = torch.cat([torch.ops.lenserve.quant_linear(x2, p.data, p.weight_type, p.shape[0], None) for p in self.parts], dim=-1)
            if self.bias is not None:
                y += self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    @property
    def num_bytes(self) -> int:
        return sum(p.num_bytes for p in self.parts) + (self.bias.numel() * 4 if self.bias is not None else 0)


def make_linear(parts: list, bias: torch.Tensor | None, prepack: bool) -> Linear | QuantLinear:
    """A linear layer over the row-wise concatenation of `parts` (tensors, or QuantWeights when the
    weights stay encoded)."""
    if any(isinstance(p, QuantWeight) for p in parts):
        return QuantLinear([p if isinstance(p, QuantWeight) else QuantWeight.from_float32(p) for p in parts], bias)
    return Linear(parts[0] if len(parts) == 1 else torch.cat(parts), bias, prepack=prepack)
