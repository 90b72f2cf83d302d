"""Function calling for models whose own template knows no tools: the definitions go into the
system prompt in the Llama 3.1 JSON tool-call style, and a call is the reply
{"name": ..., "parameters": {...}}, enforced by constrained decoding when tool_choice asks for one.

A minimal version written for the server; issue 5's tool-call formats in herd/tokenizer can
replace `system_prompt` and `parse_call` behind the same three functions.
"""

from __future__ import annotations

import json

INSTRUCTIONS = (
    "You have access to the following functions. To call a function, respond with JSON for a function call "
    'with its proper arguments, in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}. Do not use variables. If no function fits, answer normally.\n\n"
)


def system_prompt(tools: list[dict]) -> str:
    """The tool definitions as Llama 3.1 presents them: one JSON object per function."""
    return INSTRUCTIONS + "\n\n".join(json.dumps({"type": "function", "function": t}, indent=4) for t in tools)


def call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call to any of `tools`."""
    options = [{
        "type": "object",
        "properties": {"name": {"const": t["name"]},
                       "parameters": t.get("parameters") or {"type": "object", "properties": {}}},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_call(text: str, tools: list[dict]) -> dict | None:
    """{"name", "arguments"} when `text` is a call to one of `tools`, else None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    names = {t["name"] for t in tools}
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("parameters", value.get("arguments", {}))
    if not isinstance(args, dict):
        return None
    return {"name": value["name"], "arguments": json.dumps(args)}
