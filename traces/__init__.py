"""Traces: loaders (BurstGPT, Azure, Mooncake), a synthetic generator, replay and reports.

Replay is an HTTP client: nothing here imports the engine or the server.
"""
from lenserve.traces.trace import Trace, TraceRequest

__all__ = ["Trace", "TraceRequest"]
