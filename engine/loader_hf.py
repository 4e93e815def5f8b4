"""Loads an HF-format checkpoint directory: config.json, *.safetensors, tokenizer.json."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch

from lenserve.engine.model_config import ModelArchConfig
from lenserve.engine.tokenizer import Tokenizer

_SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


def hf_arch_config(path: str) -> ModelArchConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected an HF checkpoint directory or a .gguf file)")
    with open(cfg_file) as f:
        c = json.load(f)
    archs = c.get("architectures") or []
    arch = next((_SUPPORTED[a] for a in archs if a in _SUPPORTED), None)
    if arch is None:
        raise ValueError(f"{path}: architecture {archs} is not supported; supported: {sorted(_SUPPORTED)}")
    num_heads = c["num_attention_heads"]
    rope_params = c.get("rope_parameters") or {}
    rope_scaling = c.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ("llama3", "linear", "default"):
            raise ValueError(f"{path}: rope scaling {kind!r} is not supported (llama3, linear)")
    return ModelArchConfig(
        architecture=arch,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads", num_heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
        rope_theta=float(c.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        name=os.path.basename(os.path.normpath(path)),
    )


def iter_hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf(path: str) -> tuple[ModelArchConfig, Iterator[tuple[str, torch.Tensor]], Tokenizer]:
    cfg = hf_arch_config(path)
    tokenizer = Tokenizer.from_hf_dir(path)
    return cfg, iter_hf_weights(path), tokenizer


def load_model_files(
    model: str | None, keep_quantized: bool = False, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[ModelArchConfig, Iterator[tuple[str, torch.Tensor]], Tokenizer, str]:
    """Resolves --model: None → the embedded SmolLM2 GGUF; a .gguf file; an HF checkpoint directory;
    or random:NAME[:NUM_LAYERS] (engine/random_weights.py, drawn on `device` in `dtype`).
    keep_quantized: a GGUF's matrices come as QuantWeights (engine/quant.py)."""
    from lenserve.engine.random_weights import is_random_spec, load_random

    if is_random_spec(model):
        cfg, weights, tok = load_random(model, device or torch.device("cpu"), dtype)
        return cfg, weights, tok, model
    # The GGUF reader (and numpy) only when a GGUF is loaded: a random or HF model needs neither.
    from lenserve.engine.loader_gguf import EMBEDDED_MODEL_NAME, find_embedded_gguf, load_gguf

    if model is None:
        path = find_embedded_gguf()
        cfg, weights, tok = load_gguf(path, keep_quantized)
        cfg.name = EMBEDDED_MODEL_NAME
        return cfg, weights, tok, path
    if os.path.isdir(model):
        cfg, weights, tok = load_hf(model)
        return cfg, weights, tok, model
    if model.endswith(".gguf"):
        cfg, weights, tok = load_gguf(model, keep_quantized)
        cfg.name = os.path.basename(model)[: -len(".gguf")]
        return cfg, weights, tok, model
    raise FileNotFoundError(f"--model {model!r} is neither a .gguf file nor an HF checkpoint directory")
