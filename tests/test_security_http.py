"""The HTTP server under attack: a real uvicorn server on localhost with the real packaged model, raw
sockets for framing (Content-Length, chunked bodies, keep-alive smuggling, slow clients), http.client
for the rest. Each test uses a bounded number of requests and short server timeouts."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

from serving.config import ServingError

KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = [{"role": "user", "content": "Name a colour."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a prompt the model continues for as long as it is allowed
LIMITS = dict(max_body_bytes=4096, max_concurrent=2, max_connections=16, keep_alive_s=1, header_timeout_s=2.0,
              body_timeout_s=1.5, shutdown_timeout_s=2.0)


@pytest.fixture(scope="module")
def server(serving_generator):
    from serving.openai_server import ServerLimits, serve_in_thread

    srv, url = serve_in_thread(serving_generator, limits=ServerLimits(**LIMITS), api_key=KEY, default_max_tokens=4)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def wide_server(serving_generator):
    """The default limits (1 MiB bodies), for bodies that are well-formed HTTP but bad JSON requests."""
    from serving.openai_server import serve_in_thread

    srv, url = serve_in_thread(serving_generator, api_key=KEY, default_max_tokens=4)
    yield srv
    srv.shutdown()
    srv.server_close()


def port_of(srv) -> int:
    return srv.server_address[1]


# --- helpers: raw HTTP/1.1 over a socket ---------------------------------------------------------

def exchange(port: int, data: bytes, timeout: float = 10.0, pause_after: bytes | None = None) -> tuple[bytes, bool]:
    """Send ``data`` on one connection, read until the server closes it or ``timeout``; returns (bytes
    read, whether the server closed the connection)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received, closed = b"", False
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        sock.close()
    return received, closed


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream into (status, headers, body) responses (bodies framed by Content-Length)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                  auth: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected_status: int) -> dict:
    assert status == expected_status, body
    assert headers.get("content-type", "").startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"} and isinstance(error["message"], str) and error["message"]
    return error


def call(srv, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None):
    """One request on a fresh keep-alive connection; returns (status, headers, parsed JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(srv), timeout=120)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, data, headers if headers is not None else AUTH)
        response = conn.getresponse()
        raw = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw) if raw else None
    finally:
        conn.close()


SMUGGLED = b"GET /smuggled-request HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
FOLLOW_UP = request_bytes("GET", "/v1/models")


# --- body size, framing and smuggling ------------------------------------------------------------

def _no_smuggling(received: bytes, closed: bool, first_status: int) -> list:
    responses = parse_responses(received)
    assert responses, "no response at all"
    status, headers, body = responses[0]
    assert_openai_error(status, headers, body, first_status)
    assert b"smuggled-request" not in received  # the first body's remainder was never parsed as a request
    assert len(responses) <= 2
    if len(responses) == 2:  # the follow-up was answered as itself
        assert responses[1][0] == 200 and json.loads(responses[1][2])["object"] == "list"
    else:
        assert closed and headers.get("connection") == "close"
    return responses


def test_oversized_content_length_is_refused_unread_and_the_connection_not_desynchronised(server):
    padding = b"x" * (LIMITS["max_body_bytes"] + 500)
    body = b'{"messages": [], "pad": "' + padding + b'"}' + SMUGGLED  # the smuggled request sits inside the body
    received, closed = exchange(port_of(server), request_bytes("POST", "/v1/chat/completions", body) + FOLLOW_UP)
    responses = _no_smuggling(received, closed, 413)
    assert "over the limit of 4096 bytes" in json.loads(responses[0][2])["error"]["message"]


def test_oversized_chunked_body_is_cut_off_while_read(server):
    chunk = b"y" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"%x\r\n%s\r\n" % (len(SMUGGLED), SMUGGLED)
    data = request_bytes("POST", "/v1/chat/completions", chunks + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"})
    received, closed = exchange(port_of(server), data + FOLLOW_UP)
    _no_smuggling(received, closed, 413)


def test_refusal_before_the_body_is_read_closes_the_connection(server):
    body = b'{"pad": "' + b"z" * 100 + b'"}' + SMUGGLED  # within the size limit, but the key is wrong
    data = request_bytes("POST", "/v1/chat/completions", body, {"Authorization": "Bearer wrong"}, auth=False)
    received, closed = exchange(port_of(server), data + FOLLOW_UP)
    _no_smuggling(received, closed, 401)


def test_chunked_body_within_the_limit_is_served(server):
    body = json.dumps({"messages": CHAT, "max_tokens": 2}).encode()
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    data = request_bytes("POST", "/v1/chat/completions", chunked, {"Transfer-Encoding": "chunked", "Connection": "close"})
    received, _ = exchange(port_of(server), data, timeout=60)
    (status, _, payload), = parse_responses(received)
    assert status == 200 and json.loads(payload)["object"] == "chat.completion"


@pytest.mark.parametrize("headers", [
    {"Content-Length": "abc"}, {"Content-Length": "-1"}, {"Content-Length": "0x10"}, {"Content-Length": "1e3"},
    {"Content-Length": "9" * 40}, {"Content-Length": "10", "content-length": "11"},
    {"Content-Length": "5", "Transfer-Encoding": "chunked"}, {"Transfer-Encoding": "gzip"},
])
def test_invalid_framing_gets_a_400_and_a_closed_connection(server, headers):
    data = request_bytes("POST", "/v1/chat/completions", b"5\r\nhello\r\n0\r\n\r\n", headers)
    received, closed = exchange(port_of(server), data + SMUGGLED)
    responses = parse_responses(received)
    assert len(responses) == 1 and closed
    assert_openai_error(*responses[0], 400)
    assert responses[0][1].get("connection") == "close"


def test_malformed_http_and_huge_headers_get_openai_shaped_400s(server):
    # headers still incomplete past h11's 16 KiB cap are refused without waiting for their end
    for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000,
                 b"GET /v1/models HTTP/1.1\r\nBad Header\r\n\r\n"):
        received, closed = exchange(port_of(server), data)
        (response,) = parse_responses(received)
        assert closed
        assert_openai_error(*response, 400)


# --- request bodies: typed and bounded -----------------------------------------------------------

BAD_BODIES = [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": "0.7"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": float("-inf")}, "top_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 1e9}, "repetition_penalty"),
    ({"repetition_penalty": "high"}, "repetition_penalty"), ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"seed": 2 ** 70}, "seed"), ({"seed": "42"}, "seed"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10 ** 6}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"), ({"n": 3}, "n"),
    ({"model": 5}, "model"), ({"model": ["alpha"]}, "model"), ({"model": {"name": "alpha"}}, "model"),
    ({"model": "x" * 300}, "model"), ({"stop": [chr(97 + i) for i in range(17)]}, "stop"), ({"stop": 7}, "stop"),
    ({"stream": "yes"}, "stream"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": []}, "messages"), ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"), ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": "x" * 70000}]}, "content"),
    ({"messages": [{"role": "user", "content": "hi"}] * 300}, "messages"),
]


@pytest.mark.parametrize("fields, named", BAD_BODIES, ids=[f"{list(f)[0]}-{i}" for i, (f, _) in enumerate(BAD_BODIES)])
def test_bad_fields_get_400_naming_the_field(wide_server, fields, named):
    body = {"messages": CHAT, "max_tokens": 1, **fields}
    status, headers, payload = call(wide_server, "POST", "/v1/chat/completions",
                                    json.dumps(body, allow_nan=True).encode())
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "code"} and named in error["message"]


@pytest.mark.parametrize("raw", [b"", b"[]", b"null", b'"text"', b"{", b"\xff\xfe\x00", b"[" * 50000,
                                 b'{"messages": [{"role": "user", "content": "\\ud800"}]}'])
def test_bodies_that_are_not_a_json_object_get_400(wide_server, raw):
    status, _, payload = call(wide_server, "POST", "/v1/chat/completions", raw)
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"


def test_completions_prompt_is_checked(wide_server):
    for body, named in (({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": 5}, "prompt"),
                        ({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "best_of": 2}, "best_of")):
        status, _, payload = call(wide_server, "POST", "/v1/completions", body)
        assert status == 400 and named in payload["error"]["message"], payload


# --- model names and adapters ----------------------------------------------------------------------

def test_model_names_are_plain_names_and_unknown_ones_reveal_nothing(server, serving_home):
    half = serving_home / "adapters" / "half-written"
    half.mkdir()  # a folder in the registry with no manifest: must look exactly like no folder at all
    try:
        messages = {}
        for model in ("no-such-adapter", "half-written", "models", "adapters"):
            status, _, payload = call(server, "POST", "/v1/chat/completions", {"model": model, "messages": CHAT})
            assert status == 404 and payload["error"]["code"] == "model_not_found"
            messages[model] = payload["error"]["message"].replace(repr(model), "NAME")
        assert len(set(messages.values())) == 1  # the same answer whether a folder exists or not
        for model in ("../../etc", "/etc/passwd", "./alpha", "alpha/../beta", "..", ".", "a\x00b", "C:\\x", "~root"):
            status, _, payload = call(server, "POST", "/v1/chat/completions", {"model": model, "messages": CHAT})
            assert status == 400 and payload["error"]["code"] == "invalid_model", (model, payload)
        status, _, payload = call(server, "POST", "/v1/chat/completions", {"model": "foreign", "messages": CHAT})
        assert status == 404 and "trained on" in payload["error"]["message"]
        for text in (json.dumps(payload), json.dumps(messages)):
            assert str(serving_home) not in text and str(serving_home.resolve()) not in text
    finally:
        half.rmdir()
    status, _, payload = call(server, "POST", "/v1/chat/completions", {"model": "alpha", "messages": CHAT, "max_tokens": 1})
    assert status == 200 and payload["model"] == "alpha"


# --- API key -------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
                                  "Bearer ", KEY])
def test_requests_without_the_right_key_get_401(server, auth):
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth is not None else {})}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"messages": CHAT}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "alpha"}),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"})):
        status, response_headers, payload = call(server, method, path, body, headers)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        assert response_headers.get("www-authenticate") == "Bearer"


def test_the_right_key_is_accepted_and_health_is_open(server):
    status, _, payload = call(server, "GET", "/v1/models")
    assert status == 200 and {"alpha", "beta"} <= {m["id"] for m in payload["data"]}
    status, _, payload = call(server, "GET", "/health", headers={})
    assert status == 200 and payload == {"status": "ok"}


# --- timeouts and limits -------------------------------------------------------------------------

def test_slow_headers_are_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=10)
    started = time.monotonic()
    closed_after = None
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        for _ in range(40):  # one header byte every 0.2 s: never a complete request head
            try:
                sock.sendall(b"X")
                sock.settimeout(0.2)
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    finally:
        sock.close()
    assert closed_after is not None and closed_after < LIMITS["header_timeout_s"] + 3


def test_slow_body_gets_408_and_idle_keep_alive_is_closed(server):
    data = request_bytes("POST", "/v1/chat/completions", b"", {"Content-Length": "100"}) + b'{"messages":'
    received, closed = exchange(port_of(server), data, timeout=LIMITS["body_timeout_s"] + 5)
    (response,) = parse_responses(received)
    assert closed
    assert_openai_error(*response, 408)
    # an idle connection after a complete exchange is closed after keep_alive_s
    received, closed = exchange(port_of(server), FOLLOW_UP, timeout=LIMITS["keep_alive_s"] + 5)
    assert closed and parse_responses(received)[0][0] == 200


def _open_stream(srv, max_tokens: int) -> tuple[socket.socket, bytes]:
    body = json.dumps({"prompt": COUNTING, "max_tokens": max_tokens, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port_of(srv)), timeout=60)
    sock.sendall(request_bytes("POST", "/v1/completions", body, {"Content-Type": "application/json"}))
    first = b""
    while b"data: " not in first:  # the first event: the request holds its slot and is decoding
        chunk = sock.recv(4096)
        assert chunk, first
        first += chunk
    return sock, first


def test_concurrency_limit_answers_429_and_frees_slots_when_clients_leave(server):
    streams = [_open_stream(server, 400) for _ in range(LIMITS["max_concurrent"])]
    try:
        status, headers, payload = call(server, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
        assert status == 429 and payload["error"]["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
        # the event loop is free while both decode: the health check answers, and the streams are still running
        assert call(server, "GET", "/health", headers={})[0] == 200
        for sock, _ in streams:
            sock.settimeout(0.5)
            try:
                assert b"[DONE]" not in sock.recv(65536)
            except socket.timeout:
                pass
    finally:
        for sock, _ in streams:
            sock.close()  # the clients leave mid-stream
    deadline = time.monotonic() + 60
    while True:  # slots come back once the server sees the disconnects (a token or so later)
        status, _, payload = call(server, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, payload


def test_connection_cap_answers_503(serving_generator):
    from serving.openai_server import ServerLimits, serve_in_thread

    srv, _ = serve_in_thread(serving_generator, limits=ServerLimits(max_connections=3, max_concurrent=1, header_timeout_s=5))
    held = []
    try:
        held = [socket.create_connection(("127.0.0.1", port_of(srv)), timeout=5) for _ in range(3)]
        time.sleep(0.3)  # let the server accept them
        received, closed = exchange(port_of(srv), b"", timeout=5)  # sends nothing: the answer comes unasked
        (response,) = parse_responses(received)
        assert closed
        assert_openai_error(*response, 503)
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 10
        while call(srv, "GET", "/v1/models", headers={})[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        srv.shutdown()
        srv.server_close()


# --- errors are OpenAI-shaped, streams end cleanly -------------------------------------------------

def test_unknown_routes_and_methods_are_openai_shaped(server):
    for method, path, expected in (("GET", "/v2/nothing", 404), ("POST", "/v1/models", 405),
                                   ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/completions", 405),
                                   ("GET", "/docs", 404), ("GET", "/openapi.json", 404)):
        status, _, payload = call(server, method, path)
        assert status == expected and set(payload["error"]) == {"message", "type", "code"}, (method, path, payload)


class FailingAfter:
    """The real generator with a fault injected after ``n`` pieces: what a crash mid-decode looks like."""

    def __init__(self, generator, n: int, exc: Exception) -> None:
        self.generator, self.n, self.exc = generator, n, exc

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def stream(self, messages, adapter=None, params=None):
        from serving.generation import TokenStream

        real = self.generator.stream(messages, adapter, params)

        def pieces():
            for i, piece in enumerate(real):
                if i == self.n:
                    raise self.exc
                yield piece

        stream = TokenStream(pieces())
        stream.prompt_tokens = real.prompt_tokens
        return stream


@pytest.mark.parametrize("exc, shown", [(ServingError("the adapter went away; retry"), "the adapter went away"),
                                        (RuntimeError("CUDA error at /secret/path/kernel.cu"), "server log")])
def test_a_stream_that_fails_midway_ends_with_an_error_event_and_done(serving_generator, serving_home, exc, shown):
    from serving.generation import GenerationParams, OpenAIGenerator
    from serving.openai_server import serve_in_thread

    long_chat = [{"role": "user", "content": "Write a long story about a heat pump."}]
    srv, url = serve_in_thread(FailingAfter(serving_generator, 2, exc))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(srv), timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": long_chat, "max_tokens": 12, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        events = [line[6:] for line in response.read().decode().split("\n") if line.startswith("data: ")]
        conn.close()
        assert response.status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert shown in error["message"] and "/secret/path" not in error["message"] and error["type"] == "server_error"
        contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
        assert len(contents) == 2 and all(contents)  # the two pieces before the fault arrived
        with pytest.raises(ServingError, match="failed mid-answer"):  # the project's own client reports it
            OpenAIGenerator(url).stream(long_chat, params=GenerationParams(max_new_tokens=12)).text()
        # not streamed: an OpenAI-shaped error response instead
        status, _, payload = call(srv, "POST", "/v1/chat/completions", {"messages": long_chat, "max_tokens": 12}, {})
        assert status in (400, 500) and shown in payload["error"]["message"]
        assert str(serving_home) not in json.dumps(payload)
    finally:
        srv.shutdown()
        srv.server_close()


# --- binding --------------------------------------------------------------------------------------

def test_binds_loopback_by_default_and_warns_beyond_it_without_a_key(serving_generator, tmp_path):
    from serving.openai_server import exposure_warning, make_server

    srv = make_server(serving_generator, port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("0.0.0.0", "k") is None
    assert "no API key" in exposure_warning("0.0.0.0", None) and "no API key" in exposure_warning("192.168.1.5", "")
    # the CLI prints the warning before it loads anything (the model here fails to load, so nothing is bound)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                             "--home", str(tmp_path / "home"), "--set", f"base_model={tmp_path / 'no-model'}"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "listening on 0.0.0.0 with no API key" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- after all of the above ------------------------------------------------------------------------

def test_a_normal_request_is_answered_after_the_attacks(server, serving_generator):
    from serving.generation import GenerationParams

    expected = serving_generator.stream(CHAT, adapter="beta", params=GenerationParams(max_new_tokens=5)).text()
    status, _, payload = call(server, "POST", "/v1/chat/completions", {"model": "beta", "messages": CHAT, "max_tokens": 5})
    assert status == 200 and payload["choices"][0]["message"]["content"] == expected
    assert payload["usage"]["completion_tokens"] <= 5
