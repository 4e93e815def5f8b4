"""Grammar-constrained decoding: what a request asks for (a StructuredOutputSpec) and the backend
that turns it into per-sequence token masks (xgrammar_backend.py, the only backend).

The server compiles a request's grammar before queueing it (`StructuredOutputBackend.compile`
from a worker thread) so a slow compile never stalls the engine's batch; the engine then finds it
in the backend's LRU cache when the request is added.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """One constraint. `value`: the JSON schema text (json), the regex, the EBNF grammar, the
    JSON-encoded list of choices (choice), or "" (json_object). Hashable: it is the cache key."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "StructuredOutputSpec":
        # Key order is kept: xgrammar writes properties in the order the schema lists them.
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> "StructuredOutputSpec":
        return cls("choice", json.dumps(list(choices)))

    def bounded_answers(self) -> list[str] | None:
        """Every text the constraint allows, when they are few and known up front (a choice, or a
        schema that is an enum or a const): what caps the predicted length. None otherwise."""
        if self.kind == "choice":
            return json.loads(self.value)
        if self.kind == "json":
            schema = json.loads(self.value)
            if isinstance(schema, dict):
                if "const" in schema:
                    return [json.dumps(schema["const"])]
                if isinstance(schema.get("enum"), list) and schema["enum"]:
                    return [json.dumps(v) for v in schema["enum"]]
        return None
