"""Traces: loaders (BurstGPT, Azure, Mooncake), a synthetic generator, replay and reports.

Replay is an HTTP client: nothing here imports the engine or the server.
"""
from lenserve.traces.loaders import TraceFormatError, load_trace
from lenserve.traces.trace import Trace, TraceColumns, TraceRequest

__all__ = ["Trace", "TraceColumns", "TraceFormatError", "TraceRequest", "load_trace"]
