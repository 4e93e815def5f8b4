"""Engine configuration: one dataclass that the CLI, the server and the offline LLM fill."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lenserve.scheduler.config import SchedulerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
# --target-itl-ms auto, by device. CPU: 250 ms between tokens is 4 tokens/s, about the pace
# people read (200-250 words a minute, ~1.3 tokens a word), and above what a full batch's plain
# decode step takes on a 2-core machine with a 135M model (~0.1-0.2 s), so a target is there to
# spend on prompt chunks. CUDA: 50 ms, a common time-between-tokens objective for interactive
# chat on one GPU (a decode step there is ~10-30 ms).
TARGET_ITL_MS = {"cpu": 250.0, "cuda": 50.0}
WEIGHTS_DTYPES = ("auto", "fp32", "fp16", "native")


@dataclass
class EngineConfig:
    # None: the embedded SmolLM2-135M-Instruct; else a .gguf file, an HF directory, or
    # random:NAME[:NUM_LAYERS] (random weights of a known shape, engine/random_weights.py)
    model: str | None = None
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # CPU weight storage: fp32 (dtype), fp16 rows, or native (a GGUF's own encoding, nothing
    # dequantized at load); auto: native for a GGUF on CPU, else fp32 (engine/llm_engine.py's
    # _resolve_weights_dtype)
    weights_dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # auto: float16 on CPU (half the memory of fp32), the model dtype on CUDA
    kv_cache_memory_gb: float | None = None  # CPU: default 4 GiB (pages are touched only when used)
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's context length
    attention_backend: str = "auto"  # auto | kernels | torch | flash-attn
    attention: str = "packed"  # packed | padded (the baseline)
    # CUDA: decode steps replay CUDA graphs (batch sizes 1-256); True runs every step eagerly.
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; default: all cores
    # Inter-token latency target (ms) that sizes each step's prompt chunks (stall-free batching):
    # "auto" takes the device's default (TARGET_ITL_MS), None or 0 a fixed max_num_batched_tokens budget.
    target_itl_ms: float | str | None = None
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
        if isinstance(self.target_itl_ms, str) and self.target_itl_ms != "auto":
            raise ValueError(f"target_itl_ms must be 'auto', a number of milliseconds or None, got {self.target_itl_ms!r}")
        if isinstance(self.target_itl_ms, (int, float)) and not self.target_itl_ms >= 0:
            raise ValueError(f"target_itl_ms must be >= 0 (0: a fixed token budget), got {self.target_itl_ms}")
        if self.model is not None and not self.model.startswith("random:") and not os.path.exists(self.model):
            raise ValueError(f"model path does not exist: {self.model}")


def resolve_target_itl_s(target_itl_ms: float | str | None, device_type: str) -> float | None:
    """The scheduler's target_itl_s for EngineConfig.target_itl_ms on a device ("cpu", "cuda")."""
    if target_itl_ms == "auto":
        target_itl_ms = TARGET_ITL_MS.get(device_type, TARGET_ITL_MS["cuda"])
    return target_itl_ms / 1000.0 if target_itl_ms else None
