"""A small OpenAI-compatible HTTP server over a :class:`serving.generation.LocalGenerator`.

    ragtune serve --port 8000
    curl -N localhost:8000/v1/chat/completions -d '{"model": "corvida-lora", "stream": true,
         "messages": [{"role": "user", "content": "How long is the HX warranty?"}]}'

Endpoints: ``GET /v1/models`` (the base model and every usable adapter), ``POST /v1/chat/completions``
and ``POST /v1/completions``, streamed as server-sent events when ``"stream": true``. ``model`` is the
base model's id (or ``"base"``) or an adapter name, as with vLLM's LoRA serving. Standard library only
(``http.server``): one thread per connection, the generator's lock interleaves their decoding.
Errors are OpenAI-shaped: ``{"error": {"message", "type", "code"}}`` with status 400/404.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from serving.config import ServingError
from serving.generation import GenerationParams

MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _params(body: dict[str, Any], default_max: int) -> GenerationParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    try:
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or default_max)
        params = GenerationParams(
            max_new_tokens=max_tokens,
            temperature=float(body.get("temperature", 0.0) if body.get("temperature") is not None else 0.0),
            top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
            repetition_penalty=float(body.get("repetition_penalty", 1.0) or 1.0),
            stop=tuple(str(s) for s in stop),
            seed=int(body.get("seed") or 0),
        )
    except (TypeError, ValueError) as exc:
        raise RequestError(400, f"bad sampling parameter: {exc}") from None
    if params.max_new_tokens < 1 or params.temperature < 0 or not 0 < params.top_p <= 1:
        raise RequestError(400, "max_tokens must be >= 1, temperature >= 0 and 0 < top_p <= 1")
    return params


class OpenAIHandler(BaseHTTPRequestHandler):
    server_version = "ragtune-openai/1"
    protocol_version = "HTTP/1.1"
    generator: Any = None  # set on the subclass made by make_server
    default_max_tokens = 256

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default; the CLI prints one line per request
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # --- plumbing -----------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        self._send_json(status, {"error": {"message": message, "type": code, "code": status}})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(400, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _adapter_for(self, model: str | None) -> str | None:
        gen = self.generator
        if not model or model in ("base", gen.base_id):
            return None
        try:
            gen.check_adapter(model)
        except ServingError as exc:
            raise RequestError(404, f"model {model!r}: {exc}", "model_not_found") from None
        return model

    # --- routes -------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            gen = self.generator
            now = int(time.time())
            data = [{"id": gen.base_id, "object": "model", "created": now, "owned_by": "ragtune"}]
            data += [{"id": a["name"], "object": "model", "created": now, "owned_by": "ragtune", "parent": gen.base_id}
                     for a in gen.available_adapters() if a.get("usable")]
            self._send_json(200, {"object": "list", "data": data})
        elif self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {self.path}; try /v1/models", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        route = self.path.rstrip("/")
        try:
            body = self._body()
            if route in ("/v1/chat/completions", "/chat/completions"):
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                        for m in messages):
                    raise RequestError(400, "messages must be a non-empty list of {role: system|user|assistant, content: string}")
                adapter = self._adapter_for(body.get("model"))
                params = _params(body, self.default_max_tokens)
                tokens = self.generator.stream([{"role": m["role"], "content": m["content"]} for m in messages], adapter, params)
                self._respond(tokens, body, chat=True)
            elif route in ("/v1/completions", "/completions"):
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise RequestError(400, "prompt must be a non-empty string")
                adapter = self._adapter_for(body.get("model"))
                params = _params(body, self.default_max_tokens)
                self._respond(self.generator.stream_prompt(prompt, adapter, params), body, chat=False)
            else:
                raise RequestError(404, f"no route POST {self.path}; use /v1/chat/completions or /v1/completions", "not_found")
        except RequestError as exc:
            self._error(exc.status, str(exc), exc.code)
        except ServingError as exc:
            self._error(400, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away

    def _respond(self, tokens: Any, body: dict[str, Any], chat: bool) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = body.get("model") or self.generator.base_id
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(tokens)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": tokens.finish_reason}
                      if chat else {"index": 0, "text": text, "finish_reason": tokens.finish_reason})
            self._send_json(200, {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                                  "usage": self._usage(tokens)})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any], usage: dict | None = None) -> None:
            payload = {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [choice] if choice else []}
            if usage is not None:
                payload["usage"] = usage
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        try:
            if chat:
                event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            for piece in tokens:
                event({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                      else {"index": 0, "text": piece, "finish_reason": None})
            event({"index": 0, "delta": {}, "finish_reason": tokens.finish_reason} if chat
                  else {"index": 0, "text": "", "finish_reason": tokens.finish_reason})
            if (body.get("stream_options") or {}).get("include_usage"):
                event({}, self._usage(tokens))
        except ServingError as exc:  # headers are gone: report in-band, as vLLM does
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    @staticmethod
    def _usage(tokens: Any) -> dict[str, int]:
        return {"prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
                "total_tokens": tokens.prompt_tokens + tokens.completion_tokens}


def make_server(generator: Any, host: str = "127.0.0.1", port: int = 8000, default_max_tokens: int = 256,
                verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server bound to ``host:port`` (port 0 = a free port: read ``server.server_address``)."""
    handler = type("Handler", (OpenAIHandler,), {"generator": generator, "default_max_tokens": default_max_tokens})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


def serve_in_thread(generator: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread; returns (server, base URL ending in /v1). Stop with ``server.shutdown()``."""
    server = make_server(generator, host, port)
    threading.Thread(target=server.serve_forever, name="ragtune-openai", daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/v1"
