"""Weights kept in their GGUF encoding: the raw bytes of each row plus the ggml type.

lenserve._C's `quant_linear` and `quant_embedding` read these rows directly (csrc/cpu/quant_*.cpp);
nothing is dequantized at load. Row operations (llama.cpp's Q/K rope permutation, fusing q/k/v or
gate/up) move whole rows, so they work on the bytes. Once a linear layer is built, Q8_0 / Q4_0 /
Q4_1 / Q5_0 / Q5_1 / Q4_K rows are interleaved eight at a time in place (`QuantWeight.interleave`, the layout in
csrc/cpu/quant_interleaved.cpp): same bytes, reordered so the decode kernel keeps 8 rows in the
lanes of one register.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # numpy only where a GGUF is read: the engine path imports without it
    import numpy as np

# ggml types the kernels read as they are (gguf.GGMLQuantizationType values).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
KERNEL_TYPES = {F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K}
# Added to Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K: the rows are interleaved eight at a time (csrc/cpu/quant_blocks.h).
INTERLEAVED = 1024
INTERLEAVABLE = {Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K}
_BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}


def kernel_isa() -> str:
    """The instruction set of the CPU's integer GEMM over interleaved rows: "avx512_vnni"
    where the CPU has it (csrc/cpu/quant_vnni.cpp), else "avx2" (or "scalar"); "" without lenserve._C.
    LENSERVE_CPU_ISA=avx2 keeps a VNNI CPU on the AVX2 kernel (same outputs, bit for bit)."""
    from lenserve.engine._ext import has_op

    return torch.ops.lenserve.quant_kernel_isa("") if has_op("quant_linear", "cpu") else ""


def base_type(weight_type: int) -> int:
    """The GGUF type of a (possibly interleaved) weight type."""
    return weight_type & ~INTERLEAVED


def row_bytes(weight_type: int, in_features: int) -> int:
    elems, nbytes = _BLOCK[base_type(weight_type)]
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
    def interleaved(self) -> bool:
        return bool(self.weight_type & INTERLEAVED)

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(base_type(self.weight_type)).name + ("x8" if self.interleaved else "")

    def can_interleave(self) -> bool:
        return (not self.interleaved and self.weight_type in INTERLEAVABLE and self.data.shape[0] % 8 == 0
                and self.data.device.type == "cpu")

    def interleave(self) -> None:
        """In place: rows in groups of eight, interleaved for the decode kernel (same bytes)."""
        if not self.can_interleave():
            raise ValueError(f"{self.type_name} [{self.shape[0]} rows] cannot be interleaved")
        torch.ops.lenserve.quant_interleave(self.data, self.weight_type)
        self.weight_type |= INTERLEAVED

    def file_rows(self) -> torch.Tensor:
        """uint8 [out_features, row_bytes] in the file's row order and layout (a copy if interleaved)."""
        if not self.interleaved:
            return self.data
        return torch.from_numpy(deinterleave(self.data.numpy(), base_type(self.weight_type)))

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
        assert not parts[0].interleaved, "interleave after the rows are in their final order"
        return cls(torch.cat([p.data for p in parts]), parts[0].weight_type, parts[0].in_features)

    def rows(self, index: np.ndarray) -> "QuantWeight":
        assert not self.interleaved, "interleave after the rows are in their final order"
        return QuantWeight(self.data[torch.from_numpy(index)].contiguous(), self.weight_type, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 [out_features, in_features] through gguf's own dequantize (the reference)."""
        from gguf.quants import dequantize

        t = base_type(self.weight_type)
        return torch.from_numpy(dequantize(self.file_rows().numpy(), t)).float().reshape(self.shape)

    @property
    def num_bytes(self) -> int:
        return self.data.numel()


def deinterleave(data: np.ndarray, weight_type: int) -> np.ndarray:
    """uint8 [N, row_bytes] interleaved rows of a Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K matrix back in file
    layout: an independent statement of the layout in csrc/cpu/quant_interleaved.cpp (the tests
    check the kernel's in-place interleaving against it)."""
    import numpy as np

    n, rb = data.shape
    bb = _BLOCK[weight_type][1]
    nb = rb // bb
    g = n // 8
    blocks = data.reshape(g, nb, 8 * bb)  # [group, block, interleaved bytes]
    out = np.empty((g, 8, nb, bb), dtype=np.uint8)  # [group, row, block, file bytes]
    out[..., 0:2] = blocks[..., 0:16].reshape(g, nb, 8, 2).transpose(0, 2, 1, 3)  # d
    if weight_type == Q4_K:
        out[..., 2:4] = blocks[..., 16:32].reshape(g, nb, 8, 2).transpose(0, 2, 1, 3)  # dmin
        lo = blocks[..., 32:96].reshape(g, nb, 8, 8).astype(np.int32)  # [group, block, sub-block j, row]
        hi = blocks[..., 96:128].reshape(g, nb, 4, 1, 8).astype(np.int32) >> np.array([0, 4]).reshape(1, 1, 1, 2, 1)
        hi = hi.reshape(g, nb, 8, 8)  # sub-block j = 2t + (0, 1)
        sc = ((lo & 15) | (hi & 3) << 4).transpose(0, 3, 1, 2)  # [group, row, block, j], 6 bits
        mn = ((lo >> 4) | ((hi >> 2) & 3) << 4).transpose(0, 3, 1, 2)
        # the file's 12 bytes (ggml's get_scale_min_k4 read backwards)
        out[..., 4:8] = sc[..., :4] | (sc[..., 4:] >> 4) << 6
        out[..., 8:12] = mn[..., :4] | (mn[..., 4:] >> 4) << 6
        out[..., 12:16] = (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4
        # chunk 16t + p, byte 2r + e -> file qs byte 32t + 2p + e of row r
        q = blocks[..., 128:].reshape(g, nb, 4, 16, 8, 2)
        out[..., 16:] = q.transpose(0, 4, 1, 2, 3, 5).reshape(g, 8, nb, 128)
        return out.reshape(n, rb)
    at, qs_at = 16, 2  # where the next field lies: interleaved, file
    if weight_type in (Q4_1, Q5_1):
        out[..., 2:4] = blocks[..., 16:32].reshape(g, nb, 8, 2).transpose(0, 2, 1, 3)  # m
        at, qs_at = 32, 4
    if weight_type in (Q5_0, Q5_1):
        # h[p] bit 16e + r: row r's element 2p + e; bit 16e + 8 + r: its element 16 + 2p + e
        h = blocks[..., at : at + 32].copy().view("<u4")  # [group, block, chunk p]
        bits = (h[..., None] >> np.arange(32, dtype=np.uint32)) & 1  # [group, block, p, bit]
        bits = bits.reshape(g, nb, 8, 2, 2, 8)  # [group, block, p, e, low/high nibble, row]
        # element j = 16 * nibble + 2p + e of row r -> [group, block, row, nibble, p, e]
        fifth = bits.transpose(0, 1, 5, 4, 2, 3).reshape(g, nb, 8, 32).astype(np.uint32)
        qh = (fifth << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)  # [group, block, row]
        out[..., qs_at : qs_at + 4] = np.ascontiguousarray(qh.transpose(0, 2, 1), dtype="<u4")[..., None].view(np.uint8)
        at, qs_at = at + 32, qs_at + 4
    chunks = (bb - qs_at) // 2  # 16-byte chunks: each holds two bytes of every row
    # after the 8 rows' scales (mins, fifth bits): [group, block, chunk p, row, byte e]
    q = blocks[..., at:].reshape(g, nb, chunks, 8, 2)
    out[..., qs_at:] = q.transpose(0, 3, 1, 2, 4).reshape(g, 8, nb, 2 * chunks)
    return out.reshape(n, rb)
