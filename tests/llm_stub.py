"""A loopback OpenAI-compatible chat server with scripted replies, for testing the openai backend.

    with StubLLM([Reply.error(429, retry_after="120"), Reply.ok(["What is X?"])]) as stub:
        client(base_url=stub.url) ...
        assert stub.count == 2

Scripted replies are served in order; after the script runs out every request gets ``default``
(by default: well-formed JSON with as many questions as the prompt asks for, distinct per prompt).
The stub records every request body and its Authorization header, and the most requests it has had
in flight at once. Standard library only (http.server in a thread).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """One scripted HTTP response."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (past the client's timeout = a timeout)

    @classmethod
    def content(cls, text: str, delay_s: float = 0.0, prompt_tokens: int = 50,
                completion_tokens: int = 20) -> Reply:
        """A 200 chat completion whose message content is ``text`` (any string: JSON or not)."""
        body = {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        return cls(200, json.dumps(body), {"Content-Type": "application/json"}, delay_s)

    @classmethod
    def ok(cls, questions: list[str], delay_s: float = 0.0) -> Reply:
        return cls.content(json.dumps({"questions": questions}), delay_s)

    @classmethod
    def error(cls, status: int, message: str = "stub error", retry_after: str | None = None) -> Reply:
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        body = json.dumps({"error": {"message": message, "type": "stub_error", "code": status}})
        return cls(status, body, headers)


def questions_for_prompt(request: dict) -> Reply:
    """Default reply: the number of questions the prompt asks for, distinct for each prompt."""
    user = next((m["content"] for m in request.get("messages", []) if m.get("role") == "user"), "")
    match = re.search(r"Write (\d+) questions", user)
    n = int(match.group(1)) if match else 3
    tag = hashlib.sha256(user.encode()).hexdigest()[:8]
    words = re.findall(r"[A-Za-z]{5,}", user)[:n] or ["topic"]
    return Reply.ok([f"What does {words[i % len(words)]} mean in case {tag}-{i}?" for i in range(n)])


class StubLLM:
    """The server; use as a context manager. ``url`` is the base_url to give the client."""

    def __init__(self, script: list[Reply] | None = None,
                 default: Callable[[dict], Reply] = questions_for_prompt):
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def url(self) -> str:
        assert self._server is not None, "start the stub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _next_reply(self, request: dict) -> Reply:
        with self._lock:
            scripted = self.script.pop(0) if self.script else None
        return scripted if scripted is not None else self.default(request)

    def __enter__(self) -> StubLLM:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    request = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    request = {"_unparsed": raw.decode(errors="replace")}
                with stub._lock:
                    stub.requests.append(request)
                    stub.auth_headers.append(self.headers.get("Authorization", ""))
                    stub._in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub._in_flight)
                try:
                    reply = stub._next_reply(request)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    body = reply.body.encode()
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with stub._lock:
                        stub._in_flight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="stub-llm", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
