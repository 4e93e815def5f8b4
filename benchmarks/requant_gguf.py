"""Rewrite a GGUF with its matrices in another ggml type, as llama.cpp's `llama-quantize` would hold
them: each matrix dequantized by gguf's own `dequantize` and quantized again (gguf-py writes Q8_0,
Q4_0, Q4_1, Q5_0 and Q5_1; Q4_K is written here, below). Metadata and tokenizer are copied as they
are; 1-D tensors (norms) stay F32.

A matrix whose rows are not whole 256-element super-blocks cannot be Q4_K: as llama.cpp does
(src/llama-quant.cpp), it falls back to Q5_0 there. The default, Q4_K with a Q8_0 embedding, is
then what a Q4_K_M file holds for SmolLM2-135M (576 wide: Q5_0 everywhere but the 1536-wide
ffn_down), short of the Q6_K that Q4_K_M gives some attn_v / ffn_down matrices.

    python benchmarks/requant_gguf.py SRC.gguf DST.gguf [--matrix-type Q4_K] [--embedding-type Q8_0]
"""
from __future__ import annotations

import argparse

import numpy as np

# llama.cpp's fallback for a row width that is not whole super-blocks
_FALLBACK = {"Q4_K": "Q5_0"}


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, K] (K a multiple of 256) -> Q4_K blocks as uint8 [rows, K / 256 * 144].

    Each 32-element sub-block takes scale (max - min) / 15 and min -min (min clamped to <= 0, so
    x = d * sc * q - dmin * m with m >= 0); the 8 scales and mins go to 6 bits against the
    super-block's d = max scale / 63 and dmin = max min / 63. Simpler than llama.cpp's search
    (make_qkx2_quants), so a little less accurate; the format is the same."""
    rows, k = x.shape
    sub = x.reshape(rows, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / 15.0
    mins = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.rint(scale / d.astype(np.float32)[..., None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin[..., None] > 0, np.rint(mins / dmin.astype(np.float32)[..., None]), 0).clip(0, 63).astype(np.uint8)
        s_eff = d.astype(np.float32)[..., None] * sc  # [rows, blocks, 8]
        m_eff = dmin.astype(np.float32)[..., None] * mn
        q = np.where(s_eff[..., None] > 0, np.rint((sub + m_eff[..., None]) / s_eff[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8).reshape(rows, k // 256, 4, 2, 32)  # [.., 64-group t, half, l]
    out = np.empty((rows, k // 256, 144), dtype=np.uint8)
    out[..., 0:2] = d[..., None].view(np.uint8)
    out[..., 2:4] = dmin[..., None].view(np.uint8)
    # ggml's 12 packed bytes: the low 6 bits of sc / m 0..3, their top 2 bits carrying sc / m 4..7's
    out[..., 4:8] = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    out[..., 8:12] = mn[..., :4] | (mn[..., 4:] >> 4) << 6
    out[..., 12:16] = (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4
    out[..., 16:] = (q[..., 0, :] | q[..., 1, :] << 4).reshape(rows, k // 256, 128)  # byte l: element l and l + 32
    return out.reshape(rows, -1)


def _quantize(data: np.ndarray, type_name: str) -> tuple[np.ndarray, str]:
    """data [rows, K] in type_name, or in its fallback where K is not whole super-blocks."""
    from gguf.quants import quantize

    import gguf

    if type_name in _FALLBACK and data.shape[1] % 256:
        type_name = _FALLBACK[type_name]
    if type_name == "Q4_K":
        return quantize_q4_k(data), type_name
    return quantize(data, gguf.GGMLQuantizationType[type_name]), type_name


def requantize(src: str, dst: str, matrix_type: str = "Q4_K", embedding_type: str = "Q8_0", progress: bool = True) -> dict:
    """Writes dst; returns {"tensors": count by type name, "bytes": tensor bytes written}."""
    import gguf
    from gguf.quants import dequantize
    from tqdm import tqdm

    T = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the writer's own
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType[f"MOSTLY_{matrix_type}" if matrix_type != "Q4_K" else "MOSTLY_Q4_K_M"])
        vtype = field.types[0]
        writer.add_key_value(field.name, value, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    counts: dict[str, int] = {}
    nbytes = 0
    for t in tqdm(reader.tensors, desc="requantize", unit="tensor", disable=not progress):
        if len(t.shape) == 1:
            data, name = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32), "F32"
            writer.add_tensor(t.name, data)
        else:
            want = embedding_type if t.name == "token_embd.weight" else matrix_type
            data, name = _quantize(dequantize(t.data, t.tensor_type).astype(np.float32), want)
            writer.add_tensor(t.name, data, raw_dtype=T[name])
        counts[name] = counts.get(name, 0) + 1
        nbytes += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": counts, "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--matrix-type", default="Q4_K", choices=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K"])
    ap.add_argument("--embedding-type", default="Q8_0", choices=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    args = ap.parse_args()
    print(requantize(args.src, args.dst, args.matrix_type, args.embedding_type))


if __name__ == "__main__":
    main()
