"""Tool calls through the server, on top of herd.tokenizer's tool support.

A chat format that knows tools (Llama 3.x, Llama 4, a Jinja template that renders `tools`) gets
them as they are. For any other (SmolLM2's ChatML template) the server writes the definitions into
the system message as Llama 3.1 does (its JSON tool-call instructions and listing) and past calls
and results as text. Replies are read with `parse_tool_calls`; when `tool_choice` requires a call,
constrained decoding makes the reply a JSON call {"name", "parameters"} matching the schema.
"""

from __future__ import annotations

from herd.generate.json_bounds import closed, rebased
from herd.tokenizer import JinjaChat, Llama3Chat, Llama4Chat, parse_tool_calls
from herd.tokenizer.chat import json_tools_system
from herd.tokenizer.tools import json_call, normalize_tool_calls


def knows_tools(llm) -> bool:
    fmt = llm.chat_format
    return isinstance(fmt, (Llama3Chat, Llama4Chat)) or (
        isinstance(fmt, JinjaChat) and "tools" in (llm.tokenizer.chat_template or ""))


def prompt_ids(llm, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The chat prompt with `tools` (OpenAI-shaped, or None) offered to the model."""
    if knows_tools(llm):
        return llm.encode_chat(messages, tools)
    keep_tool_role = isinstance(llm.chat_format, JinjaChat)  # a template renders any role; built-ins do not
    msgs = [_as_text(m, i, keep_tool_role) for i, m in enumerate(messages)]
    if tools:
        listing = json_tools_system(tools)
        if msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": listing + msgs[0]["content"]}
        else:
            msgs.insert(0, {"role": "system", "content": listing.rstrip()})
    return llm.encode_chat(msgs)


def _as_text(m: dict, index: int, keep_tool_role: bool) -> dict:
    content = m.get("content") or ""
    if m.get("tool_calls"):
        calls = [json_call(c["function"]["name"], c["function"]["arguments"]) for c in normalize_tool_calls(m, index)]
        content = "\n".join(([content] if content else []) + calls)
    if m["role"] == "tool" and not keep_tool_role:
        return {"role": "user", "content": f"Function result: {content}"}
    return {"role": m["role"], "content": content}


def call_schema(functions: list[dict]) -> dict:
    """JSON schema of one call to any of `functions` ({"name", "parameters"} dicts). Each one's
    parameters sit in $defs, their own references ("#/...") rebased there, and the whole is
    closed (json_bounds.closed): only the declared parameters, so the model can finish the call."""
    defs, options = {}, []
    for f in functions:
        where = f"params-{f['name']}"
        defs[where] = rebased(f.get("parameters") or {"type": "object", "properties": {}}, f"#/$defs/{where}")
        options.append({"type": "object",
                        "properties": {"name": {"const": f["name"]}, "parameters": {"$ref": f"#/$defs/{where}"}},
                        "required": ["name", "parameters"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return closed({**schema, "$defs": defs})


def read_reply(text: str, functions: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool_calls) of a reply: calls only to the offered functions count."""
    reply = parse_tool_calls(text)
    names = {f["name"] for f in functions}
    if reply.tool_calls and all(c.name in names for c in reply.tool_calls):
        return reply.content or None, [c.to_openai() for c in reply.tool_calls]
    return text, []
