"""`moegate serve`, started for real (a subprocess on a free loopback port), and its batcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_abstain import KB_TEXTS, OTHER_TEXTS, kb_router
from test_router import LABELS

from moegate.router import Router, RouteScores
from moegate.serve import Batcher, ShuttingDown

HOST = "127.0.0.1"
# uvicorn exits by re-raising the signal once its graceful shutdown is done (the UNIX convention)
STOPPED = (0, -signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """``moegate serve`` in a subprocess; ``post``/``get`` return (status, parsed JSON or text)."""

    def __init__(self, router_dir, log_path, *options: str):
        self.port = free_port()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moegate.cli", "serve", "--router", str(router_dir), "--host", HOST,
             "--port", str(self.port), *options],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.log_path = log_path
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"moegate serve exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"moegate serve did not answer within 90 s:\n{log_path.read_text()}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30):
        req = urllib.request.Request(f"http://{HOST}:{self.port}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, payload, timeout: float = 30):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/route", body, timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def router_dir(tiny_bert_dir, tmp_path_factory):
    """A tiny kb_similarity router whose saved threshold routes its KB texts and abstains on the others."""
    path = kb_router(tiny_bert_dir, tmp_path_factory.mktemp("serve") / "router")
    others = max(r.kb_similarity for r in Router.from_pretrained(path, device="cpu").route(OTHER_TEXTS))
    assert others < 0.999
    config = json.loads((path / "config.json").read_text())  # the saved threshold: between KB and the others
    config["abstain"]["threshold"] = (1 + others) / 2
    (path / "config.json").write_text(json.dumps(config))
    return path


MAX_QUESTIONS, MAX_BODY = 800, 1 << 17  # the shutdown test sends requests of MAX_QUESTIONS questions


@pytest.fixture(scope="module")
def server(router_dir, tmp_path_factory):
    """One server for the whole module (a start costs seconds); the SIGTERM test, last, stops it."""
    srv = Server(router_dir, tmp_path_factory.mktemp("log") / "serve.log", "--max-questions", str(MAX_QUESTIONS),
                 "--max-body-bytes", str(MAX_BODY), "--max-batch", str(MAX_QUESTIONS), "--max-wait-ms", "5")
    yield srv
    assert srv.stop() in STOPPED, srv.log_path.read_text()


def metric(text: str, name: str) -> float:
    """The value of one Prometheus sample line (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_route_answers_what_route_does_in_process(server, router_dir):
    texts = [KB_TEXTS[0], OTHER_TEXTS[0], "什么是神经网络"]
    status, body = server.post({"questions": texts, "top_k": 2})
    assert status == 200, body
    want = Router.from_pretrained(router_dir, device="cpu").route(texts, top_k=2)
    assert [r["question"] for r in body["results"]] == texts
    for got, expected in zip(body["results"], want, strict=True):
        assert got["expert"] == expected.expert and got["exit_layer"] == expected.exit_layer
        assert got["probability"] == pytest.approx(expected.probability, abs=1e-5)
        assert got["kb_similarity"] == pytest.approx(expected.kb_similarity, abs=1e-5)
        assert list(got["distribution"]) == list(expected.distribution) and len(got["distribution"]) == 2
    # the saved threshold is the default: the KB text is routed, the others abstain; an override wins
    assert body["results"][0]["expert"] in LABELS and body["results"][1]["expert"] is None
    status, body = server.post({"questions": OTHER_TEXTS, "abstain_below": -1})
    assert status == 200 and all(r["expert"] in LABELS for r in body["results"])


def test_health_docs_and_metrics(server):
    status, health = server.get("/healthz")
    assert status == 200 and health["status"] == "ok" and health["experts"] == LABELS
    assert health["abstain"]["score"] == "kb_similarity" and health["batching"]["enabled"] is True
    status, spec = server.get("/openapi.json")
    assert status == 200 and "/route" in spec["paths"] and server.get("/docs")[0] == 200

    before = server.get("/metrics")[1]
    assert server.post({"questions": KB_TEXTS[:3] + OTHER_TEXTS[:2]})[0] == 200
    assert server.post({"questions": []})[0] == 422
    status, text = server.get("/metrics")
    assert status == 200
    routed = metric(text, "moegate_questions_total") - metric(before, "moegate_questions_total")
    abstained = metric(text, "moegate_abstentions_total") - metric(before, "moegate_abstentions_total")
    assert routed == 5 and abstained == 2
    layers = metric(text, "moegate_exit_layer_count") - metric(before, "moegate_exit_layer_count")
    assert layers == 5 and metric(text, 'moegate_exit_layer_bucket{le="3.0"}') == metric(text, "moegate_exit_layer_count")
    ok = 'moegate_requests_total{code="200",path="/route"}'
    assert metric(text, ok) - metric(before, ok) == 1
    assert metric(text, 'moegate_requests_total{code="422",path="/route"}') >= 1
    assert metric(text, 'moegate_request_seconds_count{path="/route"}') >= 2
    assert metric(text, "moegate_batch_questions_sum") >= 5


@pytest.mark.parametrize("payload, status, message", [
    ({"questions": ["q"] * (MAX_QUESTIONS + 1)}, 413, f"{MAX_QUESTIONS + 1} questions in one request; at most "),
    ({"questions": ["x" * MAX_BODY]}, 413, f"request body over {MAX_BODY} bytes"),
    ({"questions": []}, 422, "at least 1 item"),
    ({"questions": ["ok", "  "]}, 422, "questions [1] are empty or blank"),
    ({"questions": ["ok", 5]}, 422, "valid string"),
    ({"questions": "a single string"}, 422, "valid list"),
    ({"question": ["ok"]}, 422, "Field required"),
    ({"questions": ["ok"], "top_k": 0}, 422, "greater than or equal to 1"),
    ({"questions": ["ok"], "top_k": "2"}, 422, "valid integer"),
    ({"questions": ["ok"], "abstain_below": 1.5}, 422, "less than or equal to 1"),
    (b"{not json", 422, "JSON decode error"),
])
def test_limits_and_bad_requests_are_refused_with_a_message(server, payload, status, message):
    got, body = server.post(payload)
    assert got == status, body
    assert message in json.dumps(body["detail"])


def test_sigterm_answers_the_batch_in_flight_and_the_queued_requests(server):
    """Last in the module: it stops the module's server. Three requests of MAX_QUESTIONS questions each
    make three batches (a request is never split); SIGTERM arrives while the first is being scored."""
    texts = [f"{KB_TEXTS[i % 6]} and question number {i} about the long tail of words" for i in range(MAX_QUESTIONS)]
    replies = []

    def call():
        replies.append(server.post({"questions": texts}, timeout=120))

    received = server.get("/healthz")[1]["requests_received"]
    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while True:  # all three requests are in, and a batch is being scored
        health = server.get("/healthz")[1]
        if health["requests_received"] == received + 3 and health["questions_in_flight"] > 0:
            break
        assert time.monotonic() < deadline, f"no batch in flight with the three requests in: {health}"
        time.sleep(0.002)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert server.proc.wait(timeout=60) in STOPPED, server.log_path.read_text()
    assert [status for status, _ in replies] == [200, 200, 200], replies[:1]
    assert all(len(body["results"]) == MAX_QUESTIONS for _, body in replies)
    log = server.log_path.read_text()
    assert "Shutting down" in log and "batcher stopped" in log
    with pytest.raises(OSError):
        server.get("/healthz")  # nobody listens any more


# -- the batcher alone (no model, no server) --------------------------------------------------------------
def fake_scores(calls):
    def score(texts):
        calls.append(list(texts))
        n = len(texts)
        return RouteScores(np.arange(n, dtype=np.float32)[:, None].repeat(2, 1), np.ones(n, np.int64), None)
    return score


def run_batcher(requests, **options):
    calls = []

    async def main():
        batcher = Batcher(fake_scores(calls), **options)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        with pytest.raises(ShuttingDown):
            await batcher.submit(["late"])
        return results

    return calls, asyncio.run(main())


def test_batcher_gathers_concurrent_requests_into_one_call():
    requests = [["a"], ["b", "c"], ["d"], ["e", "f", "g"]]
    calls, results = run_batcher(requests, max_batch=64, max_wait_ms=50)
    assert calls == [["a", "b", "c", "d", "e", "f", "g"]]
    # each request gets its own rows of the batch, in order
    assert [r.probs[:, 0].tolist() for r in results] == [[0], [1, 2], [3], [4, 5, 6]]


def test_batcher_never_splits_a_request_and_respects_max_batch():
    calls, results = run_batcher([["a", "b"], ["c", "d"], ["e"], ["f", "g", "h", "i"]], max_batch=3, max_wait_ms=50)
    assert calls == [["a", "b"], ["c", "d", "e"], ["f", "g", "h", "i"]]  # the oversized request runs alone
    assert [len(r) for r in results] == [2, 2, 1, 4]


def test_batching_off_is_one_call_per_request():
    calls, _ = run_batcher([["a"], ["b"], ["c"]], batching=False, max_wait_ms=50)
    assert calls == [["a"], ["b"], ["c"]]


def test_a_model_error_reaches_every_request_of_its_batch():
    async def main():
        def boom(texts):
            raise RuntimeError("model failed")

        batcher = Batcher(boom, max_wait_ms=20)
        await batcher.start()
        results = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]), return_exceptions=True)
        await batcher.close()
        return results

    assert [str(r) for r in asyncio.run(main())] == ["model failed", "model failed"]
