"""Random-weight models of known shapes: `--model random:NAME[:NUM_LAYERS]`.

For checks and benchmarks that need a model's shape but not its knowledge, with no file, download
or tokenizer (a GPU machine without network, CI). Weights come from one seeded CPU generator, so
CPU and GPU runs of one spec hold the same weights (NUM_LAYERS keeps large shapes quick to draw). Matrices have std
1/sqrt(fan_in) and the embedding std 1, so hidden states keep their scale through the layers and
the logits are peaked (greedy choices are far from ties, as in a trained model). The tokenizer
maps token i to the word "t<i>".
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from lenserve.engine.model_config import ModelArchConfig
from lenserve.engine.tokenizer import Tokenizer

PREFIX = "random:"

PRESETS: dict[str, ModelArchConfig] = {
    # SmolLM2-135M: 9 heads / 3 KV heads, head_dim 64, tied embeddings.
    "smollm2-135m": ModelArchConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, name="random-smollm2-135m",
    ),
    # Llama-3-8B: 32 heads / 8 KV heads, head_dim 128, 128k vocabulary.
    "llama3-8b": ModelArchConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        name="random-llama3-8b",
    ),
    # Small enough for CPU tests: GQA group 2, head_dim 64.
    "tiny": ModelArchConfig(
        architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
        name="random-tiny",
    ),
}


def is_random_spec(model: str | None) -> bool:
    return model is not None and model.startswith(PREFIX)


def parse_spec(model: str) -> ModelArchConfig:
    """`random:NAME` or `random:NAME:NUM_LAYERS` → the preset's config (a copy)."""
    parts = model[len(PREFIX) :].split(":")
    if parts[0] not in PRESETS or len(parts) > 2:
        raise ValueError(f"--model {model!r}: expected random:NAME[:NUM_LAYERS] with NAME one of {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[parts[0]], extra={})
    if len(parts) == 2:
        if not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"--model {model!r}: NUM_LAYERS must be a positive integer, got {parts[1]!r}")
        cfg.num_layers = int(parts[1])
        cfg.name = f"{cfg.name}-{cfg.num_layers}l"
    return cfg


# The last spec's float32 weights (CPU), when it has at most this many parameters: a check that
# builds several models and engines of one spec (CPU fp32 reference, GPU bf16, graphs vs eager)
# draws them once; drawing 1.5e9 normals takes tens of seconds on one core.
_CACHE_MAX_PARAMS = 2_000_000_000
_cache: dict[tuple, list[tuple[str, torch.Tensor]]] = {}


def _draw(cfg: ModelArchConfig, seed: int) -> list[tuple[str, torch.Tensor]]:
    key = (cfg.name, cfg.num_layers, cfg.vocab_size, cfg.hidden_size, seed)
    if key in _cache:
        return _cache[key]
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).mul_(std)

    h, qs, kvs, ffn = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    weights = [("model.embed_tokens.weight", draw(cfg.vocab_size, h, std=1.0))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        weights += [
            (p + "input_layernorm.weight", torch.ones(h)),
            (p + "post_attention_layernorm.weight", torch.ones(h)),
            (p + "self_attn.q_proj.weight", draw(qs, h, std=h**-0.5)),
            (p + "self_attn.k_proj.weight", draw(kvs, h, std=h**-0.5)),
            (p + "self_attn.v_proj.weight", draw(kvs, h, std=h**-0.5)),
            (p + "self_attn.o_proj.weight", draw(h, qs, std=qs**-0.5)),
            (p + "mlp.gate_proj.weight", draw(ffn, h, std=h**-0.5)),
            (p + "mlp.up_proj.weight", draw(ffn, h, std=h**-0.5)),
            (p + "mlp.down_proj.weight", draw(h, ffn, std=ffn**-0.5)),
        ]
    weights.append(("model.norm.weight", torch.ones(h)))
    if not cfg.tie_word_embeddings:
        weights.append(("lm_head.weight", draw(cfg.vocab_size, h, std=h**-0.5)))
    _cache.clear()
    if cfg.num_params() <= _CACHE_MAX_PARAMS:
        _cache[key] = weights
    return weights


def random_weights(cfg: ModelArchConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named weights, drawn in float32 on the CPU from one seeded generator and then moved to
    `device` in `dtype` (always a copy): a spec gives the same weights on every device, so a CUDA
    bf16 run and a CPU fp32 run of one spec compare the same model."""
    for name, w in _draw(cfg, seed):
        yield name, w.to(device=device, dtype=dtype, copy=True)


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word "t<i>"; text is words separated by spaces. No end-of-sequence token:
    random models stop at max_tokens."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(tok, bos_token_id=None, eos_token_id=None, chat_template=None)


def load_random(model: str, device: torch.device, dtype: torch.dtype) -> tuple[ModelArchConfig, Iterator[tuple[str, torch.Tensor]], Tokenizer]:
    cfg = parse_spec(model)
    return cfg, random_weights(cfg, device, dtype), word_tokenizer(cfg.vocab_size)
