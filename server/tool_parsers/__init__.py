"""Tool-call formats of model families, one parser per family (vLLM's layout)."""
from lenserve.server.tool_parsers.hermes_tool_parser import HermesToolParser

__all__ = ["HermesToolParser"]
