"""JSON schemas a constrained reply can finish. A schema such as a tool's `parameters`, as most
clients write it, declares its properties but not `additionalProperties: false`, so any other key
is valid too; a small model then adds keys until its token limit, and the reply is never a whole
call. `closed` keeps a reply to what the caller declared (as vLLM's guidance backend does with
`disable-additional-properties`), and `json_object` bounds the "any JSON object" of
`response_format: json_object`. Whitespace is bounded by the grammar (constrained.py: none)."""

from __future__ import annotations

import copy

MAX_KEYS = 16  # keys of an object no schema describes
MAX_ITEMS = 16  # items of an array no schema bounds
MAX_DEPTH = 4  # objects and arrays nested in a json_object reply, the reply itself included
MAX_KEY = 64  # characters of a key no schema names
MAX_STRING = 1024  # characters of a string no schema describes
SAFE_INTEGER = 2**53 - 1  # the integers every JSON reader holds exactly (RFC 7493): 16 digits at most

# Keywords whose value is a subschema, a list of them, or a map of names to them.
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not", "if", "then",
        "else", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: dict) -> dict:
    """A copy of `schema` in which every object that declares `properties` allows no other key
    (unless it says what other keys may hold: `additionalProperties` or `patternProperties`),
    lists its required properties first (the grammar keeps the declared order, so a reply can
    end once the required ones are written), every object that declares nothing is bounded as a
    json_object's are, and every unbounded integer holds at most 16 digits (SAFE_INTEGER)."""
    schema = copy.deepcopy(schema)
    if _close(schema):
        _add_values(schema)
    return schema


def _subschemas(schema: dict) -> list:
    subs = [schema[key] for key in _ONE if isinstance(schema.get(key), dict)]
    subs += [sub for key in _LIST if isinstance(schema.get(key), list) for sub in schema[key]]
    subs += [sub for key in _MAP if isinstance(schema.get(key), dict) for sub in schema[key].values()]
    return subs


def _close(schema) -> bool:
    """Close `schema` in place; True when it now refers to the bounded values' definitions."""
    if not isinstance(schema, dict):
        return False
    refers = any([_close(sub) for sub in _subschemas(schema)])
    if schema.get("type") == "integer":
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            schema["maximum"] = SAFE_INTEGER
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            schema["minimum"] = -SAFE_INTEGER
    if "additionalProperties" in schema or "patternProperties" in schema:
        return refers
    if isinstance(schema.get("properties"), dict):
        schema["additionalProperties"] = False
        required = [k for k in schema.get("required") or [] if k in schema["properties"]]
        schema["properties"] = {k: schema["properties"][k] for k in [*required, *schema["properties"]]}
    elif schema.get("type") in ("object", ["object"]):
        most = min(schema.get("maxProperties", MAX_KEYS), MAX_KEYS)
        schema.update(_open_object(MAX_DEPTH - 1), maxProperties=most)
        return True
    return refers


def rebased(schema: dict, pointer: str) -> dict:
    """A copy of `schema` for a place `pointer` ("#/$defs/x") inside a larger schema: its own
    references ("#", "#/$defs/...") rewritten to point below `pointer`."""
    schema = copy.deepcopy(schema)
    _rebase(schema, pointer)
    return schema


def _rebase(schema, pointer: str) -> None:
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        schema["$ref"] = pointer + ref[1:]
    for sub in _subschemas(schema):
        _rebase(sub, pointer)


def json_object() -> dict:
    """The schema of `response_format: json_object` (Ollama's `format: "json"`): any JSON object
    within MAX_KEYS keys per object, MAX_ITEMS items per array and MAX_DEPTH levels of nesting."""
    return closed({"type": "object"})


def _value_name(depth: int) -> str:
    return f"herd_json_value_{depth}"


def _add_values(root: dict) -> None:
    """Put into `root`'s $defs (where "#/$defs/..." points) the JSON values nested at most 0 .. MAX_DEPTH - 1 levels deep,
    each level's arrays and objects holding the level below's values."""
    defs = root.setdefault("$defs", {})
    scalars = [{"type": "string", "maxLength": MAX_STRING}, *({"type": t} for t in ("number", "boolean", "null"))]
    defs[_value_name(0)] = {"anyOf": scalars}
    for depth in range(1, MAX_DEPTH):
        defs[_value_name(depth)] = {"anyOf": [
            *scalars, {"type": "array", "maxItems": MAX_ITEMS, "items": _value(depth - 1)},
            {"type": "object", **_open_object(depth - 1)}]}


def _value(depth: int) -> dict:
    return {"$ref": f"#/$defs/{_value_name(depth)}"}


def _open_object(depth: int) -> dict:
    """What bounds an object no schema describes, holding values nested `depth` levels deep."""
    return {"maxProperties": MAX_KEYS, "patternProperties": {f"^.{{0,{MAX_KEY}}}$": _value(depth)},
            "additionalProperties": False}
