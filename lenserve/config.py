"""Engine configuration: one dataclass that the CLI, the server and the offline LLM fill."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lenserve.scheduler.config import SchedulerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS_DTYPES = ("auto", "fp32", "fp16", "native")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct; else a .gguf file or an HF directory
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # CPU weight storage: fp32 (dtype), fp16 rows, or native (a GGUF's own encoding, nothing
    # dequantized at load); auto: native for a GGUF on CPU, else fp32
    weights_dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # auto: float16 on CPU (half the memory of fp32), the model dtype on CUDA
    kv_cache_memory_gb: float | None = None  # CPU: default 4 GiB (pages are touched only when used)
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's context length
    attention_backend: str = "auto"  # auto | kernels | torch | flash-attn
    attention: str = "packed"  # packed | padded (the baseline)
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; default: all cores
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        for name in ("dtype", "kv_cache_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {list(DTYPES)}, got {getattr(self, name)!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {list(WEIGHTS_DTYPES)}, got {self.weights_dtype!r}")
        if self.attention not in ("packed", "padded"):
            raise ValueError(f"attention must be 'packed' or 'padded', got {self.attention!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 0.99], got {self.gpu_memory_utilization}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.model is not None and not os.path.exists(self.model):
            raise ValueError(f"model path does not exist: {self.model}")
