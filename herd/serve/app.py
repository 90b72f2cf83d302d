"""The HTTP server: OpenAI and Ollama routes over one engine, /health, /metrics, the web chat at
/, API-key checks and request-size limits. `create_app` builds the app from an engine and
options, so other features (adapters, guards, more routes) can be added around it."""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import signal
import socket
import sys
from contextlib import asynccontextmanager
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from herd import __version__
from herd.engine import Engine
from herd.errors import HerdError
from herd.llm import load_drafter
from herd.serve.errors import error_body, install, responses
from herd.serve.moderation import Moderator
from herd.serve.moderation import router as moderation_routes
from herd.serve.ollama_api import router as ollama_routes
from herd.serve.openai_api import router as openai_routes
from herd.serve.service import DEFAULT_MAX_TOKENS, Service

OPEN_PATHS = {"/", "/health", "/favicon.ico", "/openapi.json", "/docs", "/redoc"}
STATIC = "/static/"  # the web chat's scripts and styles: open as / is
SHUTDOWN_GRACE = 10.0  # seconds past the drain for streams to send their last event


class MetricsText(Response):
    media_type = "text/plain; version=0.0.4"  # Prometheus' text format


def create_app(engine: Engine, *, api_key: str | None = None, name: str | None = None,
               max_body: int = 8 << 20, guard: Engine | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The app serving `engine`. `api_key`: every route but /, /health and the API docs needs
    "Authorization: Bearer KEY". Bodies over `max_body` bytes get 413. `guard`: an engine running
    a Llama Guard 3 model that screens every request and reply and answers /v1/moderations
    (without one, /v1/moderations asks the served model, which must then be a guard model).
    `max_tokens`: a reply's limit when its request sets none. On shutdown the engines are stopped
    (requests still running are cancelled)."""
    svc = Service(engine, name, max_tokens=max_tokens)
    moderator = Moderator(guard or engine, (guard.llm.name or "guard") if guard else svc.name)
    svc.moderator = moderator if guard is not None else None

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()
        if guard is not None:
            guard.stop()

    app = FastAPI(title="herd", version=__version__, lifespan=lifespan)
    app.state.service, app.state.moderator = svc, moderator  # the routes' dependencies read them
    install(app)
    key = api_key.encode() if api_key else None

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        path = request.url.path
        if key is not None and path not in OPEN_PATHS and not path.startswith(STATIC):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key):
                return JSONResponse(error_body(path, 401, "invalid or missing API key", code="invalid_api_key"),
                                    401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=max_body)

    def auth(ollama: bool = False) -> dict | None:
        return responses(401, ollama=ollama) if key is not None else None

    app.include_router(openai_routes, responses=auth())
    app.include_router(ollama_routes, responses=auth(ollama=True))
    app.include_router(moderation_routes, responses=auth())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": svc.name, **engine.stats()}

    @app.get("/metrics", response_class=MetricsText, responses=auth())
    async def metrics():
        return MetricsText(engine.metrics.render())

    page = resources.files("herd.serve").joinpath("static/index.html").read_text()
    app.mount(STATIC.rstrip("/"), StaticFiles(packages=[("herd.serve", "static")]), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app


class BodyLimit:
    """413 for a body over `limit` bytes, whether it says its length or streams in chunks; and a
    POST body is JSON whatever its Content-Type says (`curl -d` sends a form type)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            path = scope["path"]
            response = JSONResponse(error_body(path, 413, f"the request body exceeds {self.limit} bytes"), 413)
            return await response(scope, receive, send)
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        seen, too_large = 0, False

        async def limited():
            nonlocal seen, too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # stop reading; the app's answer is replaced below
                too_large = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def checked_send(message):
            if not too_large:
                return await send(message)
            if message["type"] == "http.response.start":
                response = JSONResponse(error_body(scope["path"], 413, f"the request body exceeds {self.limit} bytes"),
                                        413)
                await response(scope, receive, send)

        await self.app(scope, limited, checked_send)


def serve(llm, *, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None,
          api_key: str | None = None, max_batch: int = 8, ctx: int | None = None, kv_memory: int | None = None,
          max_queue: int = 64, drain_timeout: float = 30.0, guard=None, draft=None, lookup: bool = False,
          draft_tokens: int = 5, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Run the server until interrupted, on `sock` (from `listen`, opened before the model was
    loaded) or else on host:port. On SIGINT/SIGTERM it stops accepting connections and lets
    running requests finish for up to `drain_timeout` seconds; then what still waits gets 503
    and what still streams ends with an error event. `guard`: an LLM (Llama Guard 3) that screens
    requests and replies. `draft` (a smaller model with the same tokenizer: an LLM or what
    herd.load takes) or `lookup`: decode speculatively, `draft_tokens` per step (see herd.engine)."""
    sock = sock or listen(host, port)
    # uvicorn re-raises SIGTERM once it has drained; exit with status 0 then, not "killed by a signal".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    drafter = load_drafter(llm, draft, lookup)
    engine = Engine(llm, max_batch=max_batch, ctx=ctx, kv_memory=kv_memory, max_queue=max_queue, drafter=drafter,
                    draft_tokens=draft_tokens)
    guard_engine = None if guard is None else Engine(guard, max_batch=2, max_queue=max_queue)
    app = create_app(engine, api_key=api_key, guard=guard_engine, max_tokens=max_tokens)
    speculative = ""
    if drafter is not None:
        speculative = f", drafts by {'prompt lookup' if lookup else getattr(draft, 'name', draft)}"
    address = f"[{host}]" if ":" in host else host
    print(f"herd: serving {app.state.service.name} on http://{address}:{sock.getsockname()[1]} ({engine.n_slots} "
          f"slots x {engine.ctx} tokens, KV cache {engine.kv_bytes / 2**20:.0f} MiB{speculative})", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout + SHUTDOWN_GRACE)
    DrainingServer(config, drain_timeout, [e for e in (engine, guard_engine) if e is not None]).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port. Opened before the model loads, so that a port in use is
    a one-line error at once, and "serving on" is printed only once it is true."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections' TIME_WAIT, as uvicorn
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as e:
        sock.close()
        raise HerdError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, except that when the drain time is up the engines stop, so that what still
    runs ends as its protocol says (503, an error event) instead of being cut off by uvicorn."""

    def __init__(self, config: uvicorn.Config, drain: float, engines: list[Engine]):
        super().__init__(config)
        self.drain, self.engines = drain, engines

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        stop = loop.call_later(self.drain, lambda: loop.run_in_executor(None, self.stop_engines))
        try:
            await super().shutdown(sockets)
        finally:
            stop.cancel()

    def stop_engines(self) -> None:
        for engine in self.engines:
            engine.stop()


def api_key_from(key: str | None, key_file: str | None) -> str | None:
    """The API key: `key` (--api-key), else the contents of `key_file` less one trailing newline,
    else $HERD_API_KEY; None when none is given. One given empty, or one that a client could not
    send in a header, is an error: never a server that silently takes requests without a key."""
    if key is not None:
        where = "--api-key"
    elif key_file is not None:
        where = f"--api-key-file {key_file}"
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.read().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as e:
            raise HerdError(f"{where}: cannot read the key ({getattr(e, 'strerror', None) or e})") from None
    elif "HERD_API_KEY" in os.environ:
        where, key = "$HERD_API_KEY", os.environ["HERD_API_KEY"]
    else:
        return None
    if not key.strip():
        raise HerdError(f"{where} is empty: give a key, or none at all to serve without authentication")
    if not re.fullmatch(r"[!-~]+", key):
        raise HerdError(f"{where}: a key is printable ASCII without spaces (clients send it in an HTTP header)")
    return key
