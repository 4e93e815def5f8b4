"""Hermes-style tool calls (Hermes 2 Pro, Qwen2.5, and what SmolLM2 is prompted with here): the
model writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after any text.

For a chat template that renders no tools itself, `render_history` states the tools in the system
message in the same words Qwen2.5's template uses, and turns earlier calls and tool results into
the tags that prompt describes."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"\s*(.*?)\s*(?:" + re.escape(END) + r"|$)", re.DOTALL)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


class HermesToolParser:
    @staticmethod
    def system_prompt(tools: list[dict[str, Any]]) -> str:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            f"within {START}{END} XML tags:\n{START}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' + END
        )

    @classmethod
    def render_history(cls, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Messages for a template that knows nothing of tools: the tools' prompt joins the system
        message, assistant tool calls become tagged JSON, tool results become user turns."""
        out: list[dict[str, Any]] = []
        for m in messages:
            if m["role"] == "tool":
                out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
            elif m.get("tool_calls"):
                calls = "\n".join(
                    f"{START}\n" + json.dumps({"name": c["function"]["name"], "arguments": _loads_or_text(c["function"]["arguments"])}) + f"\n{END}"
                    for c in m["tool_calls"]
                )
                out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        if tools:
            prompt = cls.system_prompt(tools)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    @staticmethod
    def extract(text: str) -> tuple[str | None, list[ParsedCall]]:
        """The text before the first call (None when empty) and every well-formed call; a block
        that is not a JSON object with a string name stays in the content."""
        start = text.find(START)
        if start < 0:
            return (text or None), []
        calls = []
        for m in _CALL.finditer(text, start):
            try:
                obj = json.loads(m.group(1))
            except json.JSONDecodeError:
                return (text or None), []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return (text or None), []
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append(ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
        content = text[:start].strip()
        return (content or None), calls

    @staticmethod
    def content_end(text: str) -> int:
        """How much of a growing text is surely content: up to a call's start tag, or up to a
        tail that could still become one."""
        start = text.find(START)
        if start >= 0:
            return start
        for k in range(min(len(START) - 1, len(text)), 0, -1):
            if START.startswith(text[-k:]):
                return len(text) - k
        return len(text)


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
