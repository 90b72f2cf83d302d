"""Request bodies of the OpenAI and Ollama routes. Unknown fields are ignored, as OpenAI's own
server does; ranges follow OpenAI's documentation. Every string in a body, however deep, must be
Unicode: JSON can carry a lone surrogate ("\\ud800"), which no tokenizer, template or encoder takes.
And a field's value nests at most MAX_DEPTH lists and objects deep: what reads a JSON schema or a
tool's parameters recurses once per level."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

TOKEN_ID = re.compile(r"[0-9]{1,10}")
MAX_DEPTH = 32


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _checked(cls, value: Any) -> Any:
        _check(value)
        return value


def _check(value: Any, depth: int = 0) -> None:
    """Raise when `value` (a field's value: strings, lists and dicts of them; nested bodies check
    their own fields) holds a surrogate code point or nests deeper than MAX_DEPTH."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise PydanticCustomError("unicode", "the text holds a lone surrogate (\\ud800-\\udfff), "
                                                 "which is not Unicode") from None
    elif isinstance(value, (list, dict)):
        if depth == MAX_DEPTH:
            raise PydanticCustomError("depth", "nested more than {most} lists and objects deep", {"most": MAX_DEPTH})
        for item in [*value, *value.values()] if isinstance(value, dict) else value:
            _check(item, depth + 1)


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"] = "function"
    function: FunctionName


class ToolCallFunction(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(Body):
    type: str
    text: str | None = None


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Sampling(Body):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not TOKEN_ID.fullmatch(key):
                raise PydanticCustomError("token_id", "key {key} is not a token id", {"key": repr(key)})
        return bias


class ChatCompletionRequest(Sampling):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Sampling):
    model: str
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # Code Llama models: fill the gap between prompt and suffix
    response_format: ResponseFormat | None = None


# ---- Ollama ---------------------------------------------------------------------------------

class OllamaOptions(Body):
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = Field(None, ge=-2)
    num_ctx: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0.01, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""


class OllamaGenerate(Body):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None


class OllamaChat(Body):
    model: str
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None


class OllamaShow(Body):
    model: str | None = None
    name: str | None = None  # older clients
