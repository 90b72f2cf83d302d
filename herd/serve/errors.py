"""HTTP errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) or, on the
Ollama routes, Ollama's ({"error": "message"})."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from herd.engine import EngineStopped, QueueFull
from herd.errors import HerdError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


MEANINGS = {400: "The request is invalid.", 401: "The API key is missing or wrong.", 404: "No such model.",
            413: "The request body is too large.", 429: "Too many requests are waiting; retry after Retry-After seconds.",
            503: "The server is shutting down."}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class OllamaError(BaseModel):
    error: str


def responses(*statuses: int, ollama: bool = False) -> dict:
    """The OpenAPI description of error responses with `statuses`, in the OpenAI or Ollama shape."""
    return {status: {"model": OllamaError if ollama else OpenAIError, "description": MEANINGS[status]}
            for status in statuses}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if path.startswith("/api/"):
        return {"error": message}
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, e.status, e.message, e.param, e.code), e.status,
                        headers=e.headers)


def from_herd_error(e: HerdError) -> APIError:
    """A HerdError raised while handling a request: the request was at fault (400), or the engine
    is full (429) or shutting down (503)."""
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), code="shutting_down", headers={"Retry-After": "5"})
    code = "context_length_exceeded" if "context" in str(e) else None
    return APIError(400, str(e), code=code)


def _type_tag(part) -> bool:
    """Pydantic names the member of a union it tried ("str", "list[str]", "NamedToolChoice") in
    an error's location; the parameter's path is the rest."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part or part[:1].isupper())


def install(app: FastAPI) -> None:
    """Errors in each API's shape, and an OpenAPI schema that says so: a request that fails
    validation gets 400, not FastAPI's 422, so 422 is left out of the schema."""
    app.openapi = lambda: app.openapi_schema or _without_422(FastAPI.openapi(app))

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(request, e)

    @app.exception_handler(HerdError)
    async def _herd(request: Request, e: HerdError):
        return error_response(request, from_herd_error(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        # the deepest error: of a union's members, the one that got furthest says what is wrong
        first = max(e.errors(), key=lambda error: len(error.get("loc", ())), default={})
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(p)]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":  # its location is a character offset, not a parameter
            return error_response(request, APIError(400, "the request body is not valid JSON"))
        return error_response(request, APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}",
                                                param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(request, APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return error_response(request, APIError(500, f"internal error: {type(e).__name__}"))


def _without_422(schema: dict) -> dict:
    for item in schema["paths"].values():
        for operation in item.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
