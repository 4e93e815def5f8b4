"""The paged KV cache tensors: one key and one value cache per layer."""
from __future__ import annotations

import torch

from lenserve.engine.model_config import ModelArchConfig


def kv_bytes_per_block(cfg: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    def __init__(self, cfg: ModelArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        # torch.empty: pages are only touched (and counted in RSS) once blocks are used.
        self.data = torch.empty(
            (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=device
        )
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [(self.data[i, 0], self.data[i, 1]) for i in range(cfg.num_layers)]

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()
