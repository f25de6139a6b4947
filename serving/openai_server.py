"""An OpenAI-compatible HTTP server over a :class:`serving.generation.LocalGenerator`, on FastAPI + uvicorn.

    ragtune serve --port 8000                       # 127.0.0.1 only; RAGTUNE_API_KEY=... to require a key
    curl -N localhost:8000/v1/chat/completions -d '{"model": "corvida-lora", "stream": true,
         "messages": [{"role": "user", "content": "How long is the HX warranty?"}]}'

Endpoints: ``GET /v1/models`` (the base model and every usable adapter), ``POST /v1/chat/completions``
and ``POST /v1/completions``, streamed as server-sent events when ``"stream": true``; ``GET /health``;
vLLM's ``POST /v1/load_lora_adapter`` (``{"lora_name": N}``: load a registry adapter's weights now, not at
its first request; a ``lora_path`` other than that adapter's own folder is refused, so no request makes the
server read a path) and ``POST /v1/unload_lora_adapter`` (free them; rows decoding with it finish first,
and a later request naming it loads it again: the registry, not this call, decides what is served).
``model`` is the base model's id (or ``"base"``) or an adapter name, as with vLLM's LoRA serving.
Started for a collection (``ragtune serve --collection C``), the model ``"default"`` (and a request
that names no model) is the adapter promoted for ``C`` (issue 13, :mod:`serving.promotion`), read on
every request, so a promotion or rollback made by another process applies without a restart.

What the server guards, and where (limits in :class:`serving.http_guard.ServerLimits`):

- the connection and the request's framing, size, timing and API key, before this app sees a byte:
  :mod:`serving.http_guard`;
- the body (pydantic models below): every field typed (strict: no ``"5"`` for 5), bounded and finite
  (NaN/Infinity refused), unknown fields refused, ``model`` a plain name (:func:`core.names.check_name`);
  whether an adapter exists is read from the registry's listing, never by probing a path, so a 404
  tells nothing about folders, and no message carries the workspace's path;
- the model: at most ``max_concurrent`` requests generate at once; one more gets 429 with
  ``Retry-After`` at once (it does not wait). Decoding runs in worker threads (the generator's lock
  interleaves them per forward pass), never on the event loop.

Errors are always OpenAI-shaped: ``{"error": {"message", "type", "code"}}``; a stream that fails mid-way
ends with an ``{"error": ...}`` event and ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.names import InvalidName, check_name
from serving.config import ServingError
from serving.generation import GenerationParams
from serving.http_guard import (MAX_BODY_BYTES, TYPE_BY_STATUS, OpenAIServer, RequestGuard, ServerLimits, error_body,
                                exposure_warning, is_loopback, json_bytes)

log = logging.getLogger("ragtune.server")

MAX_TEXT_CHARS = 65_536  # one message's content, or a completion prompt
MAX_MESSAGES = 256
MAX_TOKENS = 4096
MAX_STOPS = 16  # OpenAI allows 4; ragtune's own client sends the assistant's stop strings (9), vLLM has no cap
_END = object()


# ---------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.headers = status, type_, code, headers


# ------------------------------------------------------------------------------- request bodies

# pydantic's strict str already refuses lone surrogates ("unable to parse raw data as a unicode string")
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
NonEmptyText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Union[Text, Annotated[list[TextPart], Field(min_length=1, max_length=64)]]
    name: Optional[Annotated[str, Field(max_length=64)]] = None  # accepted, not used

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields both endpoints share; ``n``, ``user`` and the zero penalties are accepted for client
    compatibility (they change nothing), everything else unknown is refused."""

    model: Optional[Annotated[str, Field(min_length=1, max_length=200)]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[Annotated[int, Field(ge=1, le=MAX_TOKENS)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=1, le=MAX_TOKENS)]] = None
    temperature: Optional[Annotated[Finite, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[Finite, Field(gt=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[Finite, Field(ge=0.1, le=2.0)]] = None
    seed: Optional[Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)]] = None  # torch.manual_seed's range
    stop: Optional[Union[Annotated[str, Field(min_length=1, max_length=64)],
                         Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=MAX_STOPS)]]] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    user: Optional[Annotated[str, Field(max_length=256)]] = None
    presence_penalty: Annotated[Finite, Field(ge=0.0, le=0.0)] = 0.0
    frequency_penalty: Annotated[Finite, Field(ge=0.0, le=0.0)] = 0.0

    def params(self, default_max_tokens: int) -> GenerationParams:
        temperature = self.temperature or 0.0
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=0.0 if temperature < 1e-3 else temperature,  # so small it is greedy (and cannot overflow)
            top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop,
            seed=self.seed or 0,
        )


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class CompletionRequest(_Sampling):
    prompt: Union[NonEmptyText, Annotated[list[NonEmptyText], Field(min_length=1, max_length=1)]]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class LoadLoraRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter`` body; ``lora_path`` may only name the adapter's own registry folder."""
    lora_name: Annotated[str, Field(min_length=1, max_length=200)]
    lora_path: Optional[Annotated[str, Field(min_length=1, max_length=4096)]] = None
    load_inplace: bool = False  # accepted: a retrained adapter is always reloaded in place


class UnloadLoraRequest(_Body):
    lora_name: Annotated[str, Field(min_length=1, max_length=200)]
    lora_int_id: Optional[int] = None  # accepted, not used (vLLM's numeric id)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "constrained-int", "constrained-float"}


def _validation_message(exc: ValidationError) -> str:
    """One line naming each bad field (a union's branches are reported once, by its first branch)."""
    parts: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err.get("loc", ())
                       if isinstance(x, int) or (re.fullmatch(r"[a-z_]+", x) and x not in _TYPE_TAGS)) or "body"
        if loc in parts:
            continue
        kind = err.get("type")
        parts[loc] = ("unknown field; remove it" if kind == "extra_forbidden" else
                      "required" if kind == "missing" else str(err.get("msg")))
    shown = [f"{loc}: {msg}" for loc, msg in list(parts.items())[:3]]
    more = len(parts) - len(shown)
    return "invalid request: " + "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def _parse(body: bytes, model: type[_Body]) -> Any:
    try:
        data = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise ApiError(400, f"the request body is not valid JSON ({type(exc).__name__}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object (see the OpenAI API reference)", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, _validation_message(exc), code="invalid_request") from None


# ------------------------------------------------------------------------------ concurrency

class Slots:
    """At most ``limit`` requests hold a slot; ``try_acquire`` answers at once (no queue)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self._lock = threading.Lock()

    def try_acquire(self) -> Optional["Slot"]:
        with self._lock:
            if self.active >= self.limit:
                return None
            self.active += 1
        return Slot(self)


class Slot:
    def __init__(self, slots: Slots) -> None:
        self._slots: Optional[Slots] = slots

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            with slots._lock:
                slots.active -= 1


class _SlotStreamingResponse(StreamingResponse):
    """A streamed response that frees its slot however it ends: completed, failed or client gone."""

    def __init__(self, content: Any, slot: Slot, tokens: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._slot = slot
        self._tokens = tokens

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._tokens.close()  # a client gone mid-answer: the engine drops its row at the next step
            self._slot.release()


# ------------------------------------------------------------------------------ the application

DEFAULT_MODEL = "default"  # with a collection: its promoted adapter (the base before any promotion)


class _Service:
    def __init__(self, generator: Any, limits: ServerLimits, default_max_tokens: int,
                 collection: Optional[str] = None) -> None:
        self.generator = generator
        self.limits = limits
        self.default_max_tokens = default_max_tokens
        self.collection = collection
        self.slots = Slots(limits.max_concurrent)
        home = getattr(generator, "home", None)
        self._secrets = sorted({str(home), str(home.resolve())} if home is not None else set(), key=len, reverse=True)

    def redact(self, message: str) -> str:
        """Messages leave the server without the workspace's absolute path."""
        for secret in self._secrets:
            message = message.replace(secret, "$RAGTUNE_HOME")
        return message

    def promoted(self) -> Optional[str]:
        """The adapter promoted for the server's collection now (None: the base, or no collection)."""
        from serving.promotion import current_adapter

        return current_adapter(self.generator.home, self.collection)

    def adapter_for(self, model: Optional[str]) -> Optional[str]:
        """The adapter ``model`` names (None = the base). Whether a name exists is decided by the adapter
        registry's listing, never by probing a path, so the answer tells nothing about other folders."""
        gen = self.generator
        if self.collection is not None and model in (None, DEFAULT_MODEL):
            model = self.promoted()
        if model in (None, "base", gen.base_id):
            return None
        try:
            check_name(model, "model")
        except InvalidName:
            shown = model if len(model) <= 80 else model[:77] + "..."
            raise ApiError(400, f"invalid model {shown!r}: use 'base', {gen.base_id!r} or an adapter name from "
                                "GET /v1/models (letters, digits, '_', '.', '-'; no '/' or '..')",
                           code="invalid_model") from None
        entry = {a["name"]: a for a in gen.available_adapters()}.get(model)
        if entry is None or entry.get("error"):
            raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists the models this server serves",
                           code="model_not_found")
        if not entry.get("usable", True):
            raise ApiError(404, f"model {model!r}: {self.redact(str(entry.get('why')))}", code="model_not_found")
        return model

    def open_stream(self, model: Optional[str], start: Callable[[Optional[str]], Any]) -> tuple[str, Any]:
        """Runs in a worker thread: resolve the model, load its adapter if needed, tokenize the prompt.
        Returns the model that answers (the adapter's name or the base id) and the token stream."""
        adapter = self.adapter_for(model)
        try:
            return adapter or self.generator.base_id, start(adapter)
        except InvalidName:  # the registry refused the folder (a symlink out of it, say): as if it did not exist
            raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists the models this server serves",
                           code="model_not_found") from None
        except ServingError as exc:
            if adapter is not None and "adapter" in str(exc):
                raise ApiError(404, f"model {model!r}: {self.redact(str(exc))}", code="model_not_found") from None
            raise ApiError(400, self.redact(str(exc)), code="invalid_request") from None

    def load_lora(self, req: LoadLoraRequest) -> str:
        """Runs in a worker thread: load a registry adapter's weights now rather than at its first request."""
        name = self.adapter_for(req.lora_name)
        if name is None:
            raise ApiError(400, f"{req.lora_name!r} is the base model, not an adapter", code="invalid_model")
        loader = getattr(self.generator, "load_adapter", None)
        if loader is None:
            raise ApiError(400, "this server's backend loads adapters itself", code="not_supported")
        if req.lora_path is not None:
            from tuning.adapters import adapter_dir

            try:
                same = Path(req.lora_path).expanduser().resolve() == adapter_dir(Path(self.generator.home), name).resolve()
            except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop, an unknown ~user
                same = False
            if not same:
                raise ApiError(400, "lora_path must be left out or be this adapter's own folder in the server's "
                                    "workspace: adapters are served from the workspace's registry by name (train one "
                                    "with `ragtune tune`, or copy its folder into the workspace's adapters/ folder)",
                               code="invalid_lora_path")
        try:
            loader(name)  # already loaded: nothing to do, unless it was retrained since (then reloaded)
        except ServingError as exc:
            raise ApiError(404, f"model {name!r}: {self.redact(str(exc))}", code="model_not_found") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_lora(self, req: UnloadLoraRequest) -> str:
        """Free an adapter's weights (rows decoding with it finish first); a later request loads it again."""
        loaded = getattr(self.generator, "loaded_adapters", None)
        if loaded is None:
            raise ApiError(400, "this server's backend loads adapters itself", code="not_supported")
        try:
            check_name(req.lora_name, "lora_name")
        except InvalidName as exc:
            raise ApiError(400, str(exc), code="invalid_model") from None
        names = loaded()
        if req.lora_name not in names:
            raise ApiError(404, f"adapter {req.lora_name!r} is not loaded (loaded: {', '.join(names) or 'none'})",
                           code="lora_not_loaded")
        self.generator.unload_adapter(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def models(self) -> dict[str, Any]:
        gen = self.generator
        now = int(time.time())
        data = [{"id": gen.base_id, "object": "model", "created": now, "owned_by": "ragtune"}]
        if self.collection is not None:
            data.append({"id": DEFAULT_MODEL, "object": "model", "created": now, "owned_by": "ragtune",
                         "parent": self.promoted() or gen.base_id, "collection": self.collection})
        data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "ragtune", "parent": gen.base_id}
                 for a in gen.available_adapters() if a.get("usable")]
        return {"object": "list", "data": data}


def _usage(tokens: Any) -> dict[str, int]:
    return {"prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
            "total_tokens": tokens.prompt_tokens + tokens.completion_tokens}


async def _generate(service: _Service, req: _Sampling, start: Callable[[Optional[str], GenerationParams], Any],
                    chat: bool) -> Any:
    params = req.params(service.default_max_tokens)
    slot = service.slots.try_acquire()
    if slot is None:
        raise ApiError(429, f"the server is busy ({service.limits.max_concurrent} requests generating); retry shortly",
                       "rate_limit_error", "too_many_requests", headers={"Retry-After": "1"})
    try:
        served, tokens = await run_in_threadpool(service.open_stream, req.model, lambda adapter: start(adapter, params))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        alias = service.collection is not None and req.model in (None, DEFAULT_MODEL)
        model = served if alias else (req.model or served)  # the alias shows the adapter that answered
        if not req.stream:
            try:
                text = await run_in_threadpool(lambda: "".join(tokens))
            except ServingError as exc:
                raise ApiError(400, service.redact(str(exc)), code="invalid_request") from None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": tokens.finish_reason}
                      if chat else {"index": 0, "text": text, "finish_reason": tokens.finish_reason})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                                 "model": model, "choices": [choice], "usage": _usage(tokens)})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(service, tokens, rid, created, model, chat, include_usage)
        response = _SlotStreamingResponse(events, slot, tokens, media_type="text/event-stream",
                                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        slot = None  # the response frees it when the stream ends
        return response
    finally:
        if slot is not None:
            slot.release()


async def _events(service: _Service, tokens: Any, rid: str, created: int, model: str, chat: bool, include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: Optional[dict[str, Any]], usage: Optional[dict[str, int]] = None) -> bytes:
        payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                   "choices": [choice] if choice else []}
        if usage is not None:
            payload["usage"] = usage
        return b"data: " + json_bytes(payload) + b"\n\n"

    try:
        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        while True:
            piece = await run_in_threadpool(next, tokens, _END)  # decoding never runs on the event loop
            if piece is _END:
                break
            yield event({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                        else {"index": 0, "text": piece, "finish_reason": None})
        yield event({"index": 0, "delta": {}, "finish_reason": tokens.finish_reason} if chat
                    else {"index": 0, "text": "", "finish_reason": tokens.finish_reason})
        if include_usage:
            yield event(None, _usage(tokens))
    except Exception as exc:  # noqa: BLE001 - the headers are gone: report in-band, as vLLM does
        if isinstance(exc, ServingError):
            message = service.redact(str(exc))
        else:
            log.exception("generation failed mid-stream")
            message = "the model failed while generating this answer; the server log has the details"
        yield b"data: " + json_bytes(error_body(message, "server_error", "generation_failed")) + b"\n\n"
    yield b"data: [DONE]\n\n"


def create_app(generator: Any, limits: Optional[ServerLimits] = None, api_key: Optional[str] = None,
               default_max_tokens: int = 256, collection: Optional[str] = None) -> "RequestGuard":
    """The ASGI application: FastAPI routes behind :class:`RequestGuard`; with ``collection``, the model
    ``"default"`` is that collection's promoted adapter."""
    limits = limits or ServerLimits()
    service = _Service(generator, limits, default_max_tokens, collection)
    app = FastAPI(title="ragtune", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.type, exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path[:200]}; use /v1/models, /v1/chat/completions or /v1/completions"
        else:
            message = f"{request.method} is not allowed on {request.url.path[:200]}" if exc.status_code == 405 else str(exc.detail)
        return JSONResponse(error_body(message, TYPE_BY_STATUS.get(exc.status_code, "invalid_request_error"),
                                       "not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body("internal server error; the server log has the details", "server_error", None),
                            status_code=500)

    async def models() -> JSONResponse:  # a response object: FastAPI skips its encoder pass
        return JSONResponse(await run_in_threadpool(service.models))

    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def chat_completions(request: Request) -> Any:
        req = _parse(await request.body(), ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await _generate(service, req, lambda adapter, params: generator.stream(messages, adapter, params), chat=True)

    async def completions(request: Request) -> Any:
        req = _parse(await request.body(), CompletionRequest)
        prompt = req.text()
        return await _generate(service, req, lambda adapter, params: generator.stream_prompt(prompt, adapter, params), chat=False)

    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        req = _parse(await request.body(), LoadLoraRequest)
        return PlainTextResponse(await run_in_threadpool(service.load_lora, req))

    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        req = _parse(await request.body(), UnloadLoraRequest)
        return PlainTextResponse(await run_in_threadpool(service.unload_lora, req))

    for path in ("/v1/load_lora_adapter", "/load_lora_adapter"):
        app.add_api_route(path, load_lora_adapter, methods=["POST"])
    for path in ("/v1/unload_lora_adapter", "/unload_lora_adapter"):
        app.add_api_route(path, unload_lora_adapter, methods=["POST"])
    for path in ("/v1/models", "/models"):
        app.add_api_route(path, models, methods=["GET"])
        app.add_api_route(path + "/", models, methods=["GET"], include_in_schema=False)
    for path in ("/health", "/v1/health"):
        app.add_api_route(path, health, methods=["GET"])
    for path in ("/v1/chat/completions", "/chat/completions"):
        app.add_api_route(path, chat_completions, methods=["POST"])
        app.add_api_route(path + "/", chat_completions, methods=["POST"], include_in_schema=False)
    for path in ("/v1/completions", "/completions"):
        app.add_api_route(path, completions, methods=["POST"])
        app.add_api_route(path + "/", completions, methods=["POST"], include_in_schema=False)
    return RequestGuard(app, limits, api_key)


def make_server(generator: Any, host: str = "127.0.0.1", port: int = 8000, default_max_tokens: int = 256,
                verbose: bool = False, limits: Optional[ServerLimits] = None, api_key: Optional[str] = None,
                warn: bool = True, collection: Optional[str] = None) -> OpenAIServer:
    """A server bound to ``host:port`` (port 0 = a free port: read ``server.server_address``). Logs a
    warning when it listens beyond loopback with no API key (``warn=False``: the caller prints it)."""
    limits = limits or ServerLimits()
    warning = exposure_warning(host, api_key) if warn else None
    if warning:
        log.warning(warning)
    return OpenAIServer(create_app(generator, limits, api_key, default_max_tokens, collection), host, port, limits, verbose)


def serve_in_thread(generator: Any, host: str = "127.0.0.1", port: int = 0, *, limits: Optional[ServerLimits] = None,
                    api_key: Optional[str] = None, default_max_tokens: int = 256,
                    collection: Optional[str] = None) -> tuple[OpenAIServer, str]:
    """Start a server in a daemon thread; returns (server, base URL ending in /v1). Stop with
    ``server.shutdown()``."""
    server = make_server(generator, host, port, default_max_tokens, limits=limits, api_key=api_key,
                         collection=collection).start()
    return server, server.url


__all__ = ["ServerLimits", "create_app", "make_server", "serve_in_thread", "OpenAIServer", "exposure_warning",
           "is_loopback", "ChatCompletionRequest", "CompletionRequest", "MAX_BODY_BYTES"]
