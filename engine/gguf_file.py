"""A GGUF file's metadata and tensor table, read without holding the file, and its tensors read
one at a time into fresh buffers.

Why not `gguf.GGUFReader` here: it maps the whole file and builds a numpy view for every part of
every metadata value, two per vocabulary string, so a 49k-token vocabulary with its merges costs
~150 MiB of small objects while the model loads, and every weight page read through its mapping
stays resident as file-backed memory until the mapping goes. That was most of the native-weight
server's peak memory (VmHWM 639 MiB for a 92 MiB model on top of a 264 MiB Python + torch
process). This reader parses the same layout (the `gguf` package's value and tensor types, its
block sizes) into plain Python values, closes the file, and `read_tensor` reads each tensor's
bytes with one `pread` into a buffer the caller then owns, so nothing but the weights stays.
tests/engine/test_gguf_file.py checks it field by field and byte by byte against GGUFReader.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUFValueType -> struct format of a scalar (STRING = 8 and ARRAY = 9 are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


class _Truncated(Exception):
    """The header runs past the bytes read so far."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # as GGUF lists it: innermost (row) dimension first
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def num_rows(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.data):
            raise _Truncated
        try:
            s = bytes(self.data[self.pos : self.pos + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a metadata string at byte {self.pos} is not UTF-8 ({e.reason})") from None
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in _NUMPY:
                dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.data):
                    raise _Truncated
                out = np.frombuffer(self.data, dtype, count, self.pos).tolist()
                self.pos = end
                return out
            return [self.value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")


class GGUFFile:
    """`fields`: metadata key -> Python value (lists for arrays, as GGUFReader's `contents()`);
    `tensors`: the tensor table in file order."""

    def __init__(self, path: str) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != GGUF_MAGIC:
                raise GGUFFormatError(f"{path} is not a GGUF file (no GGUF magic)")
            version = struct.unpack_from("<I", head, 4)[0]
            if version not in (2, 3):
                hint = " (a big-endian file?)" if struct.unpack_from(">I", head, 4)[0] in (2, 3) else ""
                raise GGUFFormatError(f"{path}: unsupported GGUF version {version}{hint}")
            # the metadata is read in growing pieces: a vocabulary can make it megabytes long
            buf = head
            chunk = 1 << 20
            while True:
                try:
                    header = self._parse(buf)
                    break
                except (struct.error, _Truncated):
                    if len(buf) >= size:
                        raise GGUFFormatError(f"{path}: truncated or malformed GGUF header") from None
                    buf = buf + f.read(max(chunk, len(buf)))
        self.version = version
        self.fields, raw_tensors, end = header
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{path}: general.alignment {alignment} is not a power of two")
        data_start = -(-end // alignment) * alignment
        self.tensors: list[GGUFTensorInfo] = []
        names = set()
        for name, dims, ttype, rel in raw_tensors:
            if name in names:
                raise GGUFFormatError(f"{path}: tensor {name} appears twice")
            names.add(name)
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{path}: tensor {name} has unknown type {ttype}") from None
            n_el = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFFormatError(f"{path}: tensor {name} rows of {dims[0]} are not whole blocks of {block}")
            info = GGUFTensorInfo(name, ttype, tuple(dims), data_start + rel, n_el // block * type_size)
            if info.offset + info.n_bytes > size:
                raise GGUFFormatError(f"{path}: tensor {name} runs past the end of the file")
            self.tensors.append(info)

    @staticmethod
    def _parse(data: bytes) -> tuple[dict[str, Any], list, int]:
        c = _Cursor(data)
        c.pos = 8
        n_tensors, n_kv = c.unpack("Q"), c.unpack("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            fields[key] = c.value(c.unpack("I"))
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("I")
            dims = [c.unpack("Q") for _ in range(n_dims)]
            tensors.append((name, dims, c.unpack("I"), c.unpack("Q")))
        return fields, tensors, c.pos

    def read_tensor(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a fresh uint8 array [rows, row bytes] (rows: every dimension past
        the first), read with one pread: no mapping of the file stays behind."""
        out = np.empty(info.n_bytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            view, done = memoryview(out), 0
            while done < info.n_bytes:
                n = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                if n <= 0:
                    raise GGUFFormatError(f"{self.path}: short read of tensor {info.name}")
                done += n
        return out.reshape(info.num_rows, -1)
