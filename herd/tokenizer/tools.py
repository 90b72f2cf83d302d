"""Tool calling in Meta's formats: OpenAI-shaped tool lists and messages in, structured calls out.

Rendering the prompt is the chat formats' job (chat.py); this module holds what they share: the
checks on `tools` and on assistant `tool_calls`, the text of a call in each format, and the
parser that turns a reply into calls. The parser never raises: output that looks like a call but
cannot be read comes back as text with `error` saying why.

Formats a Llama model answers in:
- JSON (Llama 3.1/3.2/3.3 templates): `{"name": "f", "parameters": {...}}`; several calls
  separated by `;` or whitespace, or a JSON list of them, are read too;
- function tag (Llama 3.1 custom prompts): `<function=f>{...}</function>`;
- pythonic (Llama 3.2 lightweight models, Llama 4): `[f(a=1, b="x"), g()]`;
- built-in (Llama 3.1): `<|python_tag|>brave_search.call(query="...")`, and raw Python after
  `<|python_tag|>` for the code interpreter;
- Llama 4 wraps calls in `<|python_start|>...<|python_end|>`; the markers are dropped.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.errors import HerdError

# The built-in tools of Llama 3.1: named in the system prompt ("Tools: ..."), called after
# <|python_tag|>. In `tools` they are written {"type": "brave_search"}, as OpenAI writes its own.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")

PYTHON_TAG = "<|python_tag|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        """The OpenAI `tool_calls` entry: arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ChatReply:
    """An assistant reply: text, tool calls, or text that looked like a call but was not one.

    `finish_reason` is "tool_calls" when there are calls, else the generation's "stop"/"length"."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None
    finish_reason: str | None = None

    def to_message(self) -> dict:
        """The reply as an assistant message, ready to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message


# ---- checking what callers pass -------------------------------------------------------------


def split_tools(tools: Sequence[Mapping] | None) -> tuple[list[dict] | None, list[str] | None]:
    """(custom function tools as given, names of built-in tools) from an OpenAI-shaped `tools`
    list; None for a kind that is absent, as the templates test `tools is not none`."""
    if tools is None:
        return None, None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise HerdError("tools must be a list of {'type': 'function', 'function': {...}} dicts")
    functions, builtin = [], []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind in BUILTIN_TOOLS:
            builtin.append(kind)
        elif kind == "function":
            fn = tool.get("function")
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise HerdError(f"tools[{i}]: 'function' must be a dict with a non-empty string 'name'")
            if not isinstance(fn.get("parameters", {}), Mapping):
                raise HerdError(f"tools[{i}]: 'parameters' of {fn['name']!r} must be a JSON-schema object")
            functions.append(dict(tool))
        else:
            raise HerdError(
                f"tools[{i}]: 'type' must be 'function' or a built-in tool ({', '.join(BUILTIN_TOOLS)}), got {kind!r}"
            )
    return functions or None, builtin or None


def normalize_tool_calls(message: Mapping, index: int) -> list[dict]:
    """The `tool_calls` of an assistant message with each call as {"id"?, "type", "function":
    {"name", "arguments": dict}}: OpenAI sends arguments as a JSON string, the templates expect a
    dict."""
    calls = message.get("tool_calls")
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise HerdError(f"messages[{index}]: 'tool_calls' must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise HerdError(f"messages[{index}].tool_calls[{j}]: needs a 'function' with a string 'name'")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise HerdError(f"messages[{index}].tool_calls[{j}]: 'arguments' is not valid JSON ({e.msg})") from None
        if not isinstance(args, Mapping):
            raise HerdError(f"messages[{index}].tool_calls[{j}]: 'arguments' must be a JSON object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}
        if isinstance(call, Mapping) and "id" in call:
            entry["id"] = call["id"]
        out.append(entry)
    return out


# ---- writing calls --------------------------------------------------------------------------


def json_call(name: str, arguments: Mapping) -> str:
    """A call as the Llama 3.x/4 templates write it."""
    return '{"name": "' + name + '", "parameters": ' + json.dumps(arguments, ensure_ascii=False) + "}"


def _python_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid Python string literal
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_python_value(str(k))}: {_python_value(v)}" for k, v in value.items()) + "}"
    raise HerdError(f"tool call argument of type {type(value).__name__} cannot be written as a Python literal")


def pythonic_calls(calls: Sequence[tuple[str, Mapping]]) -> str:
    """Calls as Llama 3.2 and Llama 4 write them: `[f(a=1, b="x"), g()]`."""
    return "[" + ", ".join(
        f"{name}(" + ", ".join(f"{k}={_python_value(v)}" for k, v in args.items()) + ")" for name, args in calls
    ) + "]"


def pythonic_system_prompt(functions: Sequence[Mapping]) -> str:
    """Meta's zero-shot tool prompt for the pythonic format (Llama 3.2 1B/3B), with the functions
    of an OpenAI `tools` list written as JSON."""
    listing = json.dumps([dict(t["function"]) for t in functions], indent=4, ensure_ascii=False)
    return (
        "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
        "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
        "If none of the function can be used, point it out. If the given question lacks the parameters required "
        "by the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
        "If you decide to invoke any of the function(s), you MUST put it in the format of "
        "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
        "You SHOULD NOT include any other text in the response.\n\n"
        "Here is a list of functions in JSON format that you can invoke.\n\n" + listing
    )


# ---- reading calls --------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][\w.\-]*\Z")
_FUNCTION_TAG = re.compile(r"<function=([^>]*)>(.*?)(?:</function>|\Z)", re.S)
_LOOKS_PYTHONIC = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_LOOKS_JSON_CALL = re.compile(r'[\[\s]*\{\s*"(name|type|function)"\s*:')
_LOOKS_BUILTIN = re.compile(r"[A-Za-z_]\w*\.call\(")
_JSON_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class _Malformed(Exception):
    pass


def parse_tool_calls(text: str) -> ChatReply:
    """Read a model's reply: tool calls in any of Meta's formats, or plain text. Never raises."""
    try:
        calls, content = _parse(text)
    except _Malformed as e:
        return ChatReply(content=text, error=str(e))
    except (RecursionError, ValueError, TypeError, MemoryError) as e:  # pathological input
        return ChatReply(content=text, error=f"unreadable tool call: {type(e).__name__}")
    if calls:
        return ChatReply(content=content, tool_calls=calls, finish_reason="tool_calls")
    return ChatReply(content=text)


def _parse(text: str) -> tuple[list[ToolCall], str]:
    body = text.strip()
    python_tag = body.startswith(PYTHON_TAG)
    if python_tag:
        body = body[len(PYTHON_TAG):].strip()
    if PYTHON_START in body:
        body = (body.replace(PYTHON_START, "").replace(PYTHON_END, "")).strip()
    if not body:
        return [], ""
    if "<function=" in body:
        return _function_tags(body)
    if _LOOKS_JSON_CALL.match(body):
        return _json_calls(body), ""
    if body.startswith("["):
        calls = _pythonic(body)
        return calls, ""
    if python_tag:
        try:
            builtin = _builtin(body)
        except _Malformed:
            builtin = None
        # anything else after <|python_tag|> is code for the code interpreter
        return [builtin or ToolCall("code_interpreter", {"code": body})], ""
    if _LOOKS_BUILTIN.match(body):
        builtin = _builtin(body)
        if builtin is not None:
            return [builtin], ""
    return [], body


def _function_tags(body: str) -> tuple[list[ToolCall], str]:
    calls = []
    for m in _FUNCTION_TAG.finditer(body):
        name, raw = m.group(1).strip(), m.group(2).strip()
        if not _NAME.match(name):
            raise _Malformed(f"function tag names no valid function: {name!r}")
        try:
            args = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise _Malformed(f"arguments of <function={name}> are not valid JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise _Malformed(f"arguments of <function={name}> are not a JSON object")
        calls.append(ToolCall(name, args))
    if not calls:
        raise _Malformed("'<function=' without a complete function tag")
    return calls, _FUNCTION_TAG.sub("", body).strip()


def _json_calls(body: str) -> list[ToolCall]:
    """One or more JSON call objects, separated by ';', ',' or whitespace, or a JSON list."""
    decoder = json.JSONDecoder()
    objects, pos = [], 0
    if body.startswith("["):
        try:
            value, pos = decoder.raw_decode(body)
        except json.JSONDecodeError as e:
            raise _Malformed(f"tool call list is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(value, list):
            raise _Malformed("tool call list is not a JSON list")
        objects = value
    else:
        while pos < len(body):
            try:
                value, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError as e:
                raise _Malformed(f"tool call is not valid JSON ({e.msg} at character {e.pos})") from None
            objects.append(value)
            while pos < len(body) and (body[pos].isspace() or body[pos] in ";,"):
                pos += 1
            if pos < len(body) and body[pos] != "{":
                raise _Malformed(f"unexpected text after a JSON tool call: {body[pos:pos + 20]!r}")
    if pos < len(body.rstrip()):
        raise _Malformed(f"unexpected text after the JSON tool calls: {body[pos:pos + 20]!r}")
    return [_json_call(obj) for obj in objects]


def _json_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        raise _Malformed("a JSON tool call must be an object")
    if isinstance(obj.get("function"), dict):  # OpenAI shape, which models sometimes echo
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _Malformed(f"JSON tool call without a valid 'name': {name!r}")
    if "parameters" not in obj and "arguments" not in obj:
        raise _Malformed(f"JSON tool call to {name!r} has no 'parameters'")
    args = obj.get("parameters", obj.get("arguments"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise _Malformed(f"arguments of {name!r} are a string that is not JSON") from None
    if not isinstance(args, dict):
        raise _Malformed(f"'parameters' of {name!r} is not a JSON object")
    return ToolCall(name, args)


def _pythonic(body: str) -> list[ToolCall]:
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as e:
        if _LOOKS_PYTHONIC.match(body):
            raise _Malformed(f"pythonic tool call list is not valid Python ({e.msg})") from None
        return []  # a bracketed answer such as "[1] see below", not a call
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return []
    if not all(isinstance(e, ast.Call) for e in tree.body.elts):
        if _LOOKS_PYTHONIC.match(body):
            raise _Malformed("pythonic tool call list holds something other than calls")
        return []
    return [_python_call(e) for e in tree.body.elts]


def _python_call(node: ast.Call) -> ToolCall:
    name = _dotted(node.func)
    if name is None:
        raise _Malformed("a pythonic tool call must name its function")
    if node.args:
        raise _Malformed(f"call to {name} passes positional arguments; tool calls take keywords only")
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise _Malformed(f"call to {name} uses **kwargs")
        args[kw.arg] = _literal(kw.value, name)
    return ToolCall(name, args)


def _builtin(body: str) -> ToolCall | None:
    """`brave_search.call(query="...")` as Llama 3.1 calls its built-in tools."""
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError:
        return None
    node = tree.body
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name)):
        return None
    return _python_call(ast.Call(func=node.func.value, args=node.args, keywords=node.keywords))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _literal(node: ast.expr, name: str) -> Any:
    """A Python literal, also accepting JSON's true/false/null, which models often write."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_LITERALS:
        return _JSON_LITERALS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, name) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Malformed(f"call to {name}: ** inside a dict argument")
        return {str(_literal(k, name)): _literal(v, name) for k, v in zip(node.keys, node.values)}
    raise _Malformed(f"call to {name}: an argument is not a literal ({ast.unparse(node)[:40]})")
