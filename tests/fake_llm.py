"""A fake OpenAI-compatible LLM server on loopback, for tests and benchmarks.

It serves `POST /v1/chat/completions` (and `/chat/completions`), plain JSON or SSE streaming,
answering with the scripted provider's brain (`runs.scripted.answer`), so replies are
deterministic and plausible. Everything is steerable per request, from Python
(`server.fail_next(...)`) or over HTTP (`POST /_control` with JSON), so another process, such
as a benchmark, can drive it too:

- latency_ms: sleep before every answer; chunk_delay_ms: sleep between streamed chunks
- a queue of one-shot behaviours for the next requests, in order:
    {"status": 429 | 500 | 401 | 400 | ..., "message": "..."}   an OpenAI-style error
    {"hang": seconds}                                           wait, then answer normally
    {"malformed": true}                                         a body that is not valid JSON
    {"drop": true, "after_chunks": n}                           close the connection (n: after
                                                                n streamed chunks, default 0)
    {"content": "...", "tool_calls": [{"name", "arguments"}]}   this reply instead of the brain's
- fault_rate with seed and fault_mix: random faults from a seeded generator
- usage: fixed prompt / completion / cached token counts in replies
- a request log (request_count, requests: the bodies) and reset()

Standalone: `python -m tests.fake_llm --port 8999 --latency-ms 500` prints its base URL.
As a pytest plugin (tests/conftest.py) it provides `fake_llm_server` (session) and `fake_llm`
(reset before and after each test).
"""

import argparse
import json
import random
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from runs import scripted

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
DEFAULT_FAULT_MIX = [
    {"status": 429, "message": "Rate limit reached (fake)"},
    {"status": 500, "message": "Internal server error (fake)"},
]
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients drop idle keep-alive connections and timed-out requests: not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakeLLMServer:
    """The server and its controls. Thread-safe: requests are served on threads."""

    api_key = "sk-fake"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: int = 0):
        self._lock = threading.Lock()
        self._httpd = _QuietServer((host, port), _Handler)
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.host, self.port = self._httpd.server_address[:2]
        self.reset()
        self.latency_ms = latency_ms

    # --- lifecycle ---

    def start(self) -> "FakeLLMServer":
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._wake.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.port}/_control"

    def model(self, name: str = "gpt-4o-mini") -> str:
        """The LiteLLM model string to use with api_base=self.base_url."""
        return f"openai/{name}"

    # --- controls ---

    def reset(self) -> None:
        """Forget requests and faults, and wake requests still hanging from an earlier test."""
        with self._lock:
            wake = getattr(self, "_wake", None)
            self._wake = threading.Event()
            self.latency_ms = 0
            self.chunk_delay_ms = 0
            self._queue: list[dict] = []
            self.fault_rate = 0.0
            self.fault_mix: list[dict] = list(DEFAULT_FAULT_MIX)
            self._rng = random.Random(0)
            self.usage: dict | None = None
            self._requests: list[dict] = []
        if wake is not None:
            wake.set()

    def fail_next(self, *behaviours: dict) -> None:
        """Queue one-shot behaviours (faults or canned replies) for the next requests."""
        with self._lock:
            self._queue.extend(dict(b) for b in behaviours)

    reply_next = fail_next  # reads better for canned replies

    def set_fault_rate(self, rate: float, seed: int = 0, mix: list[dict] | None = None) -> None:
        with self._lock:
            self.fault_rate = float(rate)
            self._rng = random.Random(seed)
            self.fault_mix = [dict(m) for m in mix] if mix else list(DEFAULT_FAULT_MIX)

    def set_usage(
        self,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """Report these token counts instead of counting (None keeps the counted figure)."""
        with self._lock:
            values = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "cached_tokens": cached_tokens,
            }
            self.usage = {k: v for k, v in values.items() if v is not None} or None

    @property
    def requests(self) -> list[dict]:
        """The JSON bodies received, oldest first."""
        with self._lock:
            return [r["body"] for r in self._requests]

    @property
    def request_log(self) -> list[dict]:
        """Each request's path, body, Authorization header and headers (lower-case names)."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def state(self, include_requests: bool = False) -> dict:
        with self._lock:
            state = {
                "base_url": self.base_url,
                "request_count": len(self._requests),
                "latency_ms": self.latency_ms,
                "chunk_delay_ms": self.chunk_delay_ms,
                "pending": list(self._queue),
                "fault_rate": self.fault_rate,
                "fault_mix": self.fault_mix,
                "usage": self.usage,
            }
            if include_requests:
                state["requests"] = [r["body"] for r in self._requests]
        return state

    def control(self, command: dict) -> dict:
        """Apply a /_control command: reset first, then every other key present."""
        if command.get("reset"):
            self.reset()
        with self._lock:
            if "latency_ms" in command:
                self.latency_ms = int(command["latency_ms"])
            if "chunk_delay_ms" in command:
                self.chunk_delay_ms = int(command["chunk_delay_ms"])
        if command.get("faults") or command.get("fail_next"):
            self.fail_next(*(command.get("faults") or command.get("fail_next")))
        if "fault_rate" in command:
            self.set_fault_rate(
                command["fault_rate"], int(command.get("seed", 0)), command.get("fault_mix")
            )
        if "usage" in command:
            self.set_usage(**(command["usage"] or {}))
        return self.state(include_requests=bool(command.get("include_requests")))

    # --- used by the handler ---

    def _record(self, path: str, body, headers: dict) -> tuple[dict | None, int]:
        """Log a request and decide what happens to it: (behaviour or None, latency_ms)."""
        with self._lock:
            self._requests.append(
                {
                    "path": path,
                    "body": body,
                    "authorization": headers.get("authorization", ""),
                    "headers": headers,
                }
            )
            behaviour = None
            if self._queue:
                behaviour = self._queue.pop(0)
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                behaviour = dict(self._rng.choice(self.fault_mix))
            return behaviour, self.latency_ms

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at reset() or stop()."""
        if seconds > 0:
            self._wake.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"
    # Headers and body go out in separate writes; with Nagle on, each answer waits ~40 ms
    # for the client's delayed ACK, which would swamp per-step overhead measurements.
    disable_nagle_algorithm = True

    @property
    def fake(self) -> FakeLLMServer:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read assertions, not logs
        pass

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/_control":
            wants = parse_qs(url.query).get("requests", ["0"])[0] not in ("0", "")
            self._send_json(200, self.fake.state(include_requests=wants))
        elif url.path in ("/v1/models", "/models"):
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "fake"}],
                },
            )
        else:
            self._send_error(404, f"no route for GET {url.path}")

    def do_POST(self):
        path = urlparse(self.path).path
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_error(400, "request body is not JSON")
            return
        if path == "/_control":
            self._send_json(200, self.fake.control(body if isinstance(body, dict) else {}))
        elif path in CHAT_PATHS:
            try:
                self._chat(path, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test); nothing to answer
        else:
            self._send_error(404, f"no route for POST {path}")

    # --- chat completions ---

    def _chat(self, path: str, body: dict) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        behaviour, latency_ms = self.fake._record(path, body, headers)
        self.fake._sleep(latency_ms / 1000)
        behaviour = behaviour or {}
        if "hang" in behaviour:
            self.fake._sleep(float(behaviour["hang"]))
        if "status" in behaviour:
            self._send_error(
                int(behaviour["status"]),
                behaviour.get("message") or f"fake error {behaviour['status']}",
            )
            return
        stream = bool(body.get("stream"))
        if behaviour.get("drop") and not (stream and behaviour.get("after_chunks")):
            self._drop()
            return
        if behaviour.get("malformed") and not stream:
            self._send_raw(
                200,
                b'{"id": "chatcmpl-broken", "object": "chat.completion", "choi',
                "application/json",
            )
            return

        messages = body.get("messages") or []
        tools = body.get("tools")
        if "content" in behaviour or "tool_calls" in behaviour:
            text = behaviour.get("content") or ""
            tool_calls = [
                {
                    "id": c.get("id") or f"call_{uuid.uuid4().hex[:12]}",
                    "name": c["name"],
                    "arguments": c.get("arguments") or {},
                }
                for c in behaviour.get("tool_calls") or []
            ]
        else:
            try:
                text, tool_calls = scripted.answer(messages, tools, body.get("response_format"))
            except scripted.ScriptedFailure as failure:
                self._send_error(failure.status_code, failure.message)
                return
        usage = self._usage(messages, tools, text, tool_calls)
        model = body.get("model") or "fake"
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(model, text, tool_calls, usage if include_usage else None, behaviour)
        else:
            self._send_json(200, _completion(model, text, tool_calls, usage))

    def _usage(self, messages, tools, text, tool_calls) -> dict:
        counted = scripted.usage_for(messages, tools, text, tool_calls)
        fixed = self.fake.usage or {}
        prompt = fixed.get("prompt_tokens", counted["prompt_tokens"])
        completion = fixed.get("completion_tokens", counted["completion_tokens"])
        cached = fixed.get("cached_tokens", 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def _stream(
        self, model: str, text: str, tool_calls: list[dict], usage: dict | None, behaviour: dict
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def chunk(delta: dict, finish_reason=None) -> dict:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": piece}) for piece in scripted.chunks(text)]
        for index, call in enumerate(tool_calls):
            arguments = json.dumps(call["arguments"])
            half = len(arguments) // 2
            # Split arguments across deltas as real servers do, so clients must assemble them.
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["name"], "arguments": arguments[:half]},
                            }
                        ]
                    }
                )
            )
            events.append(
                chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]}
                )
            )
        events.append(chunk({}, "tool_calls" if tool_calls else "stop"))
        if usage is not None:
            events.append(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )

        drop_after = int(behaviour.get("after_chunks") or 0) if behaviour.get("drop") else None
        for number, event in enumerate(events):
            if drop_after is not None and number >= drop_after:
                self._drop()
                return
            if behaviour.get("malformed") and number == 1:
                self._write_chunk(b'data: {"id": "broken", "choices": [{"delta": {"cont\n\n')
                continue
            self._write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.fake._sleep(self.fake.chunk_delay_ms / 1000)
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # --- writing ---

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _drop(self) -> None:
        """Close the connection abruptly, as a crashed proxy would."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(
            status,
            {
                "error": {
                    "message": message,
                    "type": _ERROR_TYPES.get(status, "server_error"),
                    "param": None,
                    "code": str(status),
                }
            },
        )

    def _send_json(self, status: int, data: dict) -> None:
        self._send_raw(status, json.dumps(data).encode(), "application/json")

    def _send_raw(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()


def _completion(model: str, text: str, tool_calls: list[dict], usage: dict) -> dict:
    message: dict = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
            }
            for c in tool_calls
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
        "usage": usage,
    }


# --- pytest plugin ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_llm_server():
    """One fake server for the whole session; worker processes reach it by its URL."""
    server = FakeLLMServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server):
    """The session's fake server, with no faults, latency or logged requests."""
    fake_llm_server.reset()
    yield fake_llm_server
    fake_llm_server.reset()


# --- standalone ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeLLMServer(args.host, args.port, latency_ms=args.latency_ms)
    if args.fault_rate:
        server.set_fault_rate(args.fault_rate, seed=args.seed)
    print(server.base_url, flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
