"""lenserve: an LLM inference server that predicts response lengths and schedules with them.

`from lenserve import LLM, SamplingParams` is the offline API. Imports are lazy so that
`import lenserve.scheduler` (simulated without torch) stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from lenserve.engine.sampling_params import SamplingParams
    from lenserve.llm import LLM


def __getattr__(name: str):
    if name == "LLM":
        from lenserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lenserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lenserve' has no attribute {name!r}")
