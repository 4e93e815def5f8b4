"""Llama-family decoder over packed tokens (Llama, Qwen2, Mistral, SmolLM2).

The forward takes the tokens of every scheduled sequence concatenated, their positions
(restarting at each sequence's own offset) and one AttentionMetadata; no padding exists
anywhere. Q/K/V and gate/up projections are fused into single matmuls; logits are computed only
for the rows that sample.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from lenserve.engine import ops
from lenserve.engine._ext import has_op
from lenserve.engine.attention import Attention, AttentionMetadata, backend_for
from lenserve.engine.linear import Linear, QuantLinear, make_linear
from lenserve.engine.quant import QuantWeight
from lenserve.engine.model_config import ModelArchConfig


def rope_cos_sin_cache(cfg: ModelArchConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half of the columns, sin in the second."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


class DecoderLayer:
    def __init__(self, cfg: ModelArchConfig, attention_backend: str) -> None:
        self.cfg = cfg
        self.input_norm: torch.Tensor
        self.qkv_proj: Linear | QuantLinear  # [q_size + 2 * kv_size, hidden]
        self.o_proj: Linear | QuantLinear  # [hidden, q_size]
        self.post_norm: torch.Tensor
        self.gate_up_proj: Linear | QuantLinear  # [2 * intermediate, hidden]
        self.down_proj: Linear | QuantLinear  # [hidden, intermediate]
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, attention_backend)
        self._fused: tuple | None | bool = False  # False: not looked at yet; None: this layer cannot fuse
        self.fuse_decode = True  # decode-only steps run the layer as one decode_layer call where it can

    def fused_decode_weights(self) -> tuple | None:
        """(weights, weight_types, out_features, qkv_bias) for lenserve._C's decode_layer, which runs a
        decode-only step's layer in one call on CPU; None when this layer cannot (a projection that
        is not one lenserve-packed fp32 or one quantized matrix, a bias past qkv, or no kernel)."""
        if self._fused is not False:
            return self._fused
        self._fused = None
        projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        if not has_op("decode_layer", "cpu") or self.input_norm.device.type != "cpu":
            return None
        weights, types, outs = [], [], []
        for i, proj in enumerate(projections):
            if isinstance(proj, QuantLinear) and len(proj.parts) == 1:
                part = proj.parts[0]
                weights.append(part.data), types.append(part.weight_type), outs.append(proj.out_features)
            elif isinstance(proj, Linear) and proj.lenserve_packed:
                weights.append(proj.weight), types.append(-1), outs.append(proj.out_features)
            else:
                return None
            if i > 0 and proj.bias is not None:
                return None
        if backend_for(self.attn.backend, torch.device("cpu"), torch.float32, self.cfg.head_dim) != "kernels":
            return None
        self._fused = (weights, types, outs, self.qkv_proj.bias)
        return self._fused

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        if self.fuse_decode and _fusable_step(meta, hidden):
            fused = self.fused_decode_weights()
            if fused is not None:
                if residual is None:
                    residual = torch.zeros_like(hidden)  # 0 + hidden == hidden exactly: the first layer's norm
                weights, types, outs, qkv_bias = fused
                hidden = torch.ops.lenserve.decode_layer(
                    hidden, residual, positions, self.input_norm, self.post_norm, eps, weights, types, outs, qkv_bias,
                    cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cos_sin, k_cache, v_cache, meta.slot_mapping,
                    meta.block_tables, meta.context_lens, self.attn.scale)
                return hidden, residual
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, self.input_norm, eps)
        else:
            ops.fused_add_rms_norm(hidden, residual, self.input_norm, eps)
        qkv = self.qkv_proj(hidden)  # [T, q + 2kv]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        ops.rotary_embedding(positions, q, k, cfg.head_dim, cos_sin)
        n = hidden.shape[0]
        attn_out = self.attn(
            q.view(n, cfg.num_heads, cfg.head_dim),
            k.view(n, cfg.num_kv_heads, cfg.head_dim),
            v.view(n, cfg.num_kv_heads, cfg.head_dim),
            k_cache,
            v_cache,
            meta,
        )
        hidden = self.o_proj(attn_out.reshape(n, cfg.q_size))
        ops.fused_add_rms_norm(hidden, residual, self.post_norm, eps)
        gate_up = self.gate_up_proj(hidden)
        hidden = self.down_proj(ops.silu_and_mul(gate_up))
        return hidden, residual


def _fusable_step(meta: AttentionMetadata, hidden: torch.Tensor) -> bool:
    """A decode-only, unpadded step on fp32 activations: what decode_layer / decode_layers compute."""
    return meta.num_prefill_tokens == 0 and not meta.padded_len_q and hidden.dtype == torch.float32


class LlamaModel:
    """Weights plus a packed forward. Build with `from_weights`."""

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, attention_backend: str = "auto") -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.embed_tokens: torch.Tensor | QuantWeight
        self.norm: torch.Tensor
        self.lm_head: Linear | QuantLinear
        self.layers = [DecoderLayer(cfg, attention_backend) for _ in range(cfg.num_layers)]
        self.prepack_linear = True
        self.weights_dtype = "fp32"
        self.cos_sin_cache = rope_cos_sin_cache(cfg, cfg.max_position_embeddings, device)
        # decode-only steps run every layer in one decode_layers call where each layer can fuse
        self.fuse_decode_layers = True
        self._stack: tuple | None | bool = False  # _fused_stack's answer, once asked
        self._bound_stack = None  # lenserve._C.DecodeStack over _fused_stack and the caches below
        self._bound_caches: list | None = None

    def _fused_stack(self) -> tuple | None:
        """(input_norms, post_norms, weights, weight_types, out_features, qkv_biases) of every layer for
        lenserve._C's decode_layers, or None when a layer cannot fuse (DecoderLayer.fused_decode_weights)."""
        if self._stack is not False:
            return self._stack
        self._stack = None
        fused = [layer.fused_decode_weights() for layer in self.layers]
        if not has_op("decode_layers", "cpu") or any(f is None for f in fused) or len({tuple(f[2]) for f in fused}) != 1:
            return None
        biases = [f[3] for f in fused]
        self._stack = ([layer.input_norm for layer in self.layers], [layer.post_norm for layer in self.layers],
                       [w for f in fused for w in f[0]], [t for f in fused for t in f[1]], list(fused[0][2]),
                       [] if all(b is None for b in biases) else biases)
        return self._stack

    def _decode_stack(self, stack: tuple, kv_caches: list):
        """The extension's DecodeStack: the decode_layers op with `stack` and these caches bound
        once, so a step passes only its own tensors (the 364 of SmolLM2's layers, converted from
        Python lists on every call, were ~0.13 ms of a ~3.5 ms batch-1 step). Rebuilt when the
        caches are other tensors."""
        bound = self._bound_caches  # set together with _bound_stack
        if bound is not None and len(bound) == len(kv_caches) and all(a is b for a, b in zip(bound, kv_caches)):
            return self._bound_stack
        from lenserve.engine._ext import extension

        input_norms, post_norms, weights, types, outs, biases = stack
        cfg = self.cfg
        self._bound_stack = extension().DecodeStack(
            input_norms, post_norms, cfg.rms_norm_eps, weights, types, outs, biases, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, self.cos_sin_cache, [k for k, _ in kv_caches], [v for _, v in kv_caches], self.layers[0].attn.scale)
        self._bound_caches = list(kv_caches)
        return self._bound_stack

    @classmethod
    def from_weights(
        cls,
        cfg: ModelArchConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device,
        attention_backend: str = "auto",
        prepack_linear: bool = True,
        weights_dtype: str = "fp32",
    ) -> "LlamaModel":
        """prepack_linear=False keeps torch's own GEMM on CPU (bitwise closer to transformers).
        weights_dtype (CPU): "fp32" holds matrices in `dtype`; "fp16" holds matrices and the
        embedding as fp16 rows; "native" keeps the QuantWeights the loader yields as they are."""
        if weights_dtype in ("fp16", "native") and device.type != "cpu":
            raise ValueError(f"weights_dtype {weights_dtype!r} runs on CPU only; on {device.type} use dtype")
        model = cls(cfg, dtype, device, attention_backend)
        model.prepack_linear = prepack_linear
        model.weights_dtype = weights_dtype
        pending: dict[int, dict[str, torch.Tensor | QuantWeight]] = {}
        seen: set[str] = set()

        def put(w: torch.Tensor) -> torch.Tensor:
            return w.to(device=device, dtype=dtype).contiguous()

        def put_matrix(w: torch.Tensor | QuantWeight) -> torch.Tensor | QuantWeight:
            if isinstance(w, QuantWeight):
                return w
            return QuantWeight.from_float16(w) if weights_dtype == "fp16" else put(w)

        for name, w in weights:
            seen.add(name)
            if name == "model.embed_tokens.weight":
                model.embed_tokens = put_matrix(w)
            elif name == "model.norm.weight":
                model.norm = put(w)
            elif name == "lm_head.weight":
                model.lm_head = make_linear([put_matrix(w)], None, prepack_linear)
            elif name.startswith("model.layers."):
                idx_s, rest = name[len("model.layers.") :].split(".", 1)
                idx = int(idx_s)
                if idx >= cfg.num_layers:
                    raise ValueError(f"weight {name} for layer {idx}, but the model has {cfg.num_layers} layers")
                pending.setdefault(idx, {})[rest] = w
                model._maybe_finish_layer(idx, pending, put, put_matrix)
        missing = [i for i in range(cfg.num_layers) if not hasattr(model.layers[i], "down_proj")]
        if missing:
            have = sorted(pending.get(missing[0], {}))
            raise ValueError(f"checkpoint is missing weights of layer {missing[0]} (found {have})")
        for attr, hf in (("embed_tokens", "model.embed_tokens.weight"), ("norm", "model.norm.weight")):
            if not hasattr(model, attr):
                raise ValueError(f"checkpoint is missing {hf}")
        if not hasattr(model, "lm_head"):
            if not cfg.tie_word_embeddings and "lm_head.weight" not in seen:
                cfg.tie_word_embeddings = True
            model.lm_head = make_linear([model.embed_tokens], None, prepack_linear)
        return model

    def _maybe_finish_layer(self, idx: int, pending: dict[int, dict], put, put_matrix) -> None:
        p = pending[idx]
        need = [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ]
        if self.cfg.attention_bias:
            need += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if any(n not in p for n in need):
            return
        layer = self.layers[idx]
        cfg = self.cfg
        qkv = [put_matrix(p[f"self_attn.{n}_proj.weight"]) for n in "qkv"]
        got = (sum(w.shape[0] for w in qkv), qkv[0].shape[1])
        expected = (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
        if got != expected or any(w.shape[1] != expected[1] for w in qkv):
            raise ValueError(f"layer {idx}: fused qkv weight has shape {got}, expected {expected}")
        qkv_bias = None
        if cfg.attention_bias:
            qkv_bias = put(torch.cat([p["self_attn.q_proj.bias"], p["self_attn.k_proj.bias"], p["self_attn.v_proj.bias"]]))
        pp = self.prepack_linear
        layer.qkv_proj = make_linear(qkv, qkv_bias, pp)
        layer.o_proj = make_linear([put_matrix(p["self_attn.o_proj.weight"])], None, pp)
        layer.input_norm = put(p["input_layernorm.weight"])
        layer.post_norm = put(p["post_attention_layernorm.weight"])
        gate_up = [put_matrix(p["mlp.gate_proj.weight"]), put_matrix(p["mlp.up_proj.weight"])]
        layer.gate_up_proj = make_linear(gate_up, None, pp)
        layer.down_proj = make_linear([put_matrix(p["mlp.down_proj.weight"])], None, pp)
        del pending[idx]

    def num_bytes(self) -> int:
        tensors = [self.norm] + [t for l in self.layers for t in (l.input_norm, l.post_norm)]
        linears = [p for l in self.layers for p in (l.qkv_proj, l.o_proj, l.gate_up_proj, l.down_proj)]
        embed = self.embed_tokens
        n = embed.num_bytes if isinstance(embed, QuantWeight) else embed.numel() * embed.element_size()
        if not self.cfg.tie_word_embeddings or not isinstance(embed, QuantWeight):
            linears.append(self.lm_head)  # a tied QuantLinear shares the embedding's rows
        return n + sum(t.numel() * t.element_size() for t in tensors) + sum(p.num_bytes for p in linears)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens
        if isinstance(w, QuantWeight):
            return torch.ops.lenserve.quant_embedding(input_ids, w.data, w.weight_type, w.in_features)
        return F.embedding(input_ids, w)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logits_indices: torch.Tensor | None,  # int64 [num_sampling_rows]; None: every row
        capture_layers: tuple[int, ...] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits of the sampling rows; with `capture_layers`, also the residual stream after each of
        those layers at the same rows, side by side in that order (float32 [num_sampling_rows,
        len(capture_layers) * hidden_size]), as `(logits, states)`."""
        hidden = self.embed(input_ids)
        residual = None
        captured: dict[int, torch.Tensor] = {}
        rows = slice(None) if logits_indices is None else logits_indices
        stack = None
        if (capture_layers is None and self.fuse_decode_layers and _fusable_step(meta, hidden)
                and all(layer.fuse_decode for layer in self.layers)):
            stack = self._fused_stack()
        if stack is not None:
            residual = torch.zeros_like(hidden)  # 0 + hidden == hidden exactly: the first layer's norm
            hidden = self._decode_stack(stack, kv_caches).run(
                hidden, residual, positions, meta.slot_mapping, meta.block_tables, meta.context_lens)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers if stack is None else [], kv_caches)):
            hidden, residual = layer.forward(positions, hidden, residual, k_cache, v_cache, meta, self.cos_sin_cache)
            if capture_layers is not None and i in capture_layers:
                captured[i] = (hidden[rows] + residual[rows]).float()
        if logits_indices is not None:
            hidden, residual = hidden[logits_indices], residual[logits_indices]
        hidden = hidden.contiguous()
        ops.fused_add_rms_norm(hidden, residual.contiguous(), self.norm, self.cfg.rms_norm_eps)
        logits = self.lm_head(hidden).float()
        if capture_layers is None:
            return logits
        return logits, torch.cat([captured[i] for i in capture_layers], dim=-1)
