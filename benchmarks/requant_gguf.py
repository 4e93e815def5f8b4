"""Rewrite a GGUF with its matrices in another ggml type, as llama.cpp's `llama-quantize` would hold
them: each matrix dequantized by gguf's own `dequantize` and quantized again by gguf-py (which
writes Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, not the K-quants). Metadata and tokenizer are copied as
they are; 1-D tensors (norms) stay F32.

The default is what a Q4_K_M file holds for a model whose rows are not whole 256-element
super-blocks, as SmolLM2-135M's (576 wide) and Qwen2.5-0.5B's (896) are: llama.cpp falls back from
Q4_K to Q5_0 there (src/llama-quant.cpp), and from Q6_K to Q8_0 for the token embedding. SmolLM2's
1536-wide ffn_down, which such a file keeps as Q4_K / Q6_K, becomes Q5_0 here too.

    python benchmarks/requant_gguf.py SRC.gguf DST.gguf [--matrix-type Q5_0] [--embedding-type Q8_0]
"""
from __future__ import annotations

import argparse

import numpy as np


def requantize(src: str, dst: str, matrix_type: str = "Q5_0", embedding_type: str = "Q8_0", progress: bool = True) -> dict:
    """Writes dst; returns {"tensors": count by type name, "bytes": tensor bytes written}."""
    import gguf
    from gguf.quants import dequantize, quantize
    from tqdm import tqdm

    T = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the writer's own
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType[f"MOSTLY_{matrix_type}"])
        vtype = field.types[0]
        writer.add_key_value(field.name, value, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    counts: dict[str, int] = {}
    nbytes = 0
    for t in tqdm(reader.tensors, desc="requantize", unit="tensor", disable=not progress):
        if len(t.shape) == 1:
            data, qtype = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32), T.F32
            writer.add_tensor(t.name, data)
        else:
            qtype = T[embedding_type if t.name == "token_embd.weight" else matrix_type]
            data = quantize(dequantize(t.data, t.tensor_type).astype(np.float32), qtype)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
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
    ap.add_argument("--matrix-type", default="Q5_0", choices=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    ap.add_argument("--embedding-type", default="Q8_0", choices=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    args = ap.parse_args()
    print(requantize(args.src, args.dst, args.matrix_type, args.embedding_type))


if __name__ == "__main__":
    main()
