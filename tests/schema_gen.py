"""Random JSON schemas for structured-output tests and the benchmark: strict-mode objects with
nested objects, arrays with min/max items, enums, patterns and bounded numbers."""
from __future__ import annotations

import random


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A strict-mode schema: nested objects, arrays with min/max items, enums, patterns, bounded numbers."""
    kinds = ["int", "number", "enum", "pattern", "string", "bool"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if kind == "number":
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 100)}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "cyan", "North", "south-east", "x y"], rng.randint(1, 4))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[a-z]{2,6}$", r"^[A-Z][0-9]{3}$", r"^(yes|no)-[0-9]{1,2}$"])}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    names = rng.sample(["id", "name", "size", "kind", "color", "tags", "ok", "score"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names}, "required": names,
            "additionalProperties": False}


def root_schema(rng: random.Random) -> dict:
    names = rng.sample(["a", "b", "c", "d"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: random_schema(rng, 1) for n in names}, "required": names, "additionalProperties": False}
