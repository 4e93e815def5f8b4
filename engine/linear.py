"""Linear layers. On CPU in fp32 the weights are prepacked once for oneDNN (through torch's mkldnn
ops), which streams them at close to memory bandwidth for the skinny matrices of decode, where
the default BLAS path reaches about half of it. Elsewhere this is F.linear.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

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
        if prepack and weight.device.type == "cpu" and weight.dtype == torch.float32 and _mkldnn_linear_available():
            try:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
                self.packed = True
                return
            except RuntimeError as e:
                logger.warning("oneDNN weight prepacking failed (%s); using F.linear", e)
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    @property
    def num_bytes(self) -> int:
        n = self.out_features * self.in_features * 4 if self.packed else self.weight.numel() * self.weight.element_size()
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)
