"""The openai backend against a loopback stub server: retries, wait cap, bad replies, cache, key hygiene.

No test asserts on the wall clock: the backend's waits are recorded by the ``sleeps`` fixture instead of
slept, and what happened is read from counters (requests the stub saw, the waits asked for, the outcome's
own counts), so a loaded machine cannot fail them.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from llm_stub import Reply, StubLLM

from moegate import llm
from moegate.llm import (
    BadReply,
    LLMError,
    OpenAIQuestionWriter,
    OpenAISettings,
    parse_questions,
    request_key,
)

KEY_ENV = "MOEGATE_TEST_KEY"
SECRET = "sk-test-SECRET-d41d8cd98f00b204e980"
TEXT = "Photosynthesis converts light energy into chemical energy stored in glucose inside chloroplasts."


class _RecordedSleeps:
    """Stands in for moegate.llm's ``time`` module: ``sleep`` records the wait instead of sleeping."""

    def __init__(self):
        self.sleeps: list[float] = []
        self._lock = threading.Lock()  # questions_for calls from a thread pool

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch) -> list[float]:
    """The waits moegate.llm asked for, in order (none is slept)."""
    recorder = _RecordedSleeps()
    monkeypatch.setattr(llm, "time", recorder)
    return recorder.sleeps


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def writer(stub: StubLLM, tmp_path, **overrides) -> OpenAIQuestionWriter:
    settings = dict(model="stub-model", base_url=stub.url, api_key_env=KEY_ENV, temperature=0.0,
                    max_tokens=200, concurrency=2, max_retries=3, max_wait_s=5.0, timeout_s=5.0,
                    response_format="json_object", max_bad_replies=2)
    settings.update(overrides)
    return OpenAIQuestionWriter(OpenAISettings(**settings), tmp_path / "cache")


# -- parsing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ('{"questions": ["What is X?", "Why Y?"]}', ["What is X?", "Why Y?"]),
    ('["What is X?", "Why Y?"]', ["What is X?", "Why Y?"]),
    ('```json\n{"questions": ["What is X?"]}\n```', ["What is X?"]),
    ('Sure! Here you go: {"questions": ["What is X?"]} Hope it helps.', ["What is X?"]),
    ("Here are four questions:\n1. What is X?\n2) Why does Y happen?\n\nEnjoy",
     ["What is X?", "Why does Y happen?"]),
    ("- What is X?\n* How is Y made?\n• Why Z?", ["What is X?", "How is Y made?", "Why Z?"]),
    ('{"questions": ["What is X?", "How does Y work?", "Why is Z tru', ["What is X?", "How does Y work?"]),
    ("What is X?\nHow is Y measured?", ["What is X?", "How is Y measured?"]),
    ('{"questions": ["  What   is\\nX? "]}', ["What is X?"]),
])
def test_parse_accepts_json_and_lists(reply, expected):
    assert parse_questions(reply) == expected


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"),
    (None, "empty"),
    ('{"questions": [1, 2]}', "off-schema"),
    ('{"questions": []}', "off-schema"),
    ('{"questions": ["ok?", "   "]}', "off-schema"),
    ('{"answers": ["What is X?"]}', "off-schema"),
    ('{"questions": "What is X?"}', "off-schema"),
    ("I cannot help with that.", "neither JSON nor a list"),
    ('{"questions": [', "not valid JSON"),
])
def test_parse_rejects_bad_replies(reply, reason):
    with pytest.raises(BadReply, match=reason):
        parse_questions(reply)


def test_request_key_covers_the_request_but_not_the_key(key, tmp_path):
    with StubLLM() as stub:
        w = writer(stub, tmp_path)
        a = w.build_request(TEXT, 3)
        assert request_key(a) == request_key(json.loads(json.dumps(a)))
        assert request_key(a) != request_key(w.build_request(TEXT, 4))
        assert request_key(a) != request_key({**a, "temperature": 0.5})
        assert SECRET not in json.dumps(a)


# -- the stub server --------------------------------------------------------------------------------

def test_success_counts_tokens_and_sends_the_configured_request(key, tmp_path):
    questions = ["What is photosynthesis?", "Where are chloroplasts?", "What is glucose?"]
    with StubLLM([Reply.ok(questions)]) as stub:
        out = writer(stub, tmp_path).questions("e/0/0", TEXT, 3)
    assert out.failure is None
    assert out.questions == questions
    assert (out.calls, out.cache_misses, out.prompt_tokens, out.completion_tokens) == (1, 1, 50, 20)
    sent = stub.requests[0]
    assert sent["model"] == "stub-model" and sent["response_format"] == {"type": "json_object"}
    assert sent["max_tokens"] == 200 and TEXT in sent["messages"][1]["content"]
    assert stub.auth_headers[0] == f"Bearer {SECRET}"  # the key is used, from the environment


def test_429_with_long_retry_after_is_capped_and_counted(key, tmp_path, sleeps):
    with StubLLM(default=lambda r: Reply.error(429, "slow down", retry_after="120")) as stub:
        out = writer(stub, tmp_path, max_retries=3, max_wait_s=0.5).questions("e/0/0", TEXT, 3)
    assert out.failure == "rate_limited" and "Retry-After 120" in out.detail
    assert sleeps == [0.5], f"asked to wait {sleeps} s: the Retry-After cap did not hold"
    assert out.waited_s == 0.5
    assert stub.count == 2  # the first try, one retry after the clipped wait; then the budget is spent
    assert out.questions == [] and out.cache_misses == 1


def test_retry_count_cap_holds_when_waits_are_short(key, tmp_path, sleeps):
    with StubLLM(default=lambda r: Reply.error(503, retry_after="0")) as stub:
        out = writer(stub, tmp_path, max_retries=2, max_wait_s=5).questions("e/0/0", TEXT, 3)
    assert out.failure == "server_error" and stub.count == 3  # 1 + max_retries
    assert sleeps == [0.0, 0.0]  # Retry-After 0 honoured between the tries


def test_500_then_success(key, tmp_path, sleeps):
    with StubLLM([Reply.error(500, "boom"), Reply.ok(["What is glucose?"])]) as stub:
        out = writer(stub, tmp_path).questions("e/0/0", TEXT, 3)
    assert out.failure is None and out.questions == ["What is glucose?"]
    assert stub.count == 2 and len(sleeps) == 1 and 0.375 <= sleeps[0] <= 0.625  # one backoff: 0.5 s ± 25 %
    assert out.waited_s == sleeps[0]


def test_malformed_json_is_retried_then_skipped_and_cached(key, tmp_path):
    with StubLLM(default=lambda r: Reply.content('{"questions": ["What is')) as stub:
        out = writer(stub, tmp_path, max_bad_replies=2).questions("e/0/0", TEXT, 3)
        assert out.failure == "bad_reply" and out.bad_replies == 3 and stub.count == 3
        # the re-ask shows the model its reply and asks again for JSON
        assert stub.requests[1]["messages"][-2] == {"role": "assistant", "content": '{"questions": ["What is'}
        assert "could not be read" in stub.requests[1]["messages"][-1]["content"]
        again = writer(stub, tmp_path, max_bad_replies=2).questions("e/0/0", TEXT, 3)
        assert stub.count == 3  # a rerun replays the cached bad replies: no new request
    assert again.failure == "bad_reply" and again.cache_hits == 3


def test_off_schema_reply_is_repaired_by_a_re_ask(key, tmp_path):
    script = [Reply.content('{"questions": [{"q": 1}]}'), Reply.ok(["What is a chloroplast?"])]
    with StubLLM(script) as stub:
        out = writer(stub, tmp_path).questions("e/0/0", TEXT, 3)
    assert out.failure is None and out.questions == ["What is a chloroplast?"]
    assert out.bad_replies == 1 and stub.count == 2


def test_timeout_is_retried_within_the_caps(key, tmp_path, sleeps):
    # the replies come after 3 s: a "timeout" outcome means the client gave up at timeout_s, not later
    with StubLLM(default=lambda r: Reply.ok(["late?"], delay_s=3.0)) as stub:
        out = writer(stub, tmp_path, timeout_s=0.4, max_retries=1, max_wait_s=0.2).questions("e/0/0", TEXT, 3)
    assert out.failure == "timeout" and "timeout_s=0.4" in out.detail
    assert stub.count == 2  # 1 + max_retries
    assert sleeps == [0.2] and out.waited_s == 0.2  # the ~0.5 s backoff clipped to max_wait_s


@pytest.mark.parametrize("broken", [
    Reply(200, "<html>gateway</html>", {"Content-Type": "text/plain"}),
    Reply(200, "<html>gateway</html>", {"Content-Type": "application/json"}),
])
def test_a_200_that_is_not_a_completion_is_retried(key, tmp_path, broken):
    with StubLLM([broken, Reply.ok(["What is glucose?"])]) as stub:
        out = writer(stub, tmp_path).questions("e/0/0", TEXT, 3)
    assert out.failure is None and out.questions == ["What is glucose?"] and stub.count == 2
    with StubLLM(default=lambda r: broken) as stub:
        out = writer(stub, tmp_path / "fresh", max_retries=1).questions("e/0/1", TEXT, 3)
    assert out.failure == "malformed_response" and stub.count == 2


def test_bad_request_is_not_retried(key, tmp_path):
    with StubLLM(default=lambda r: Reply.error(400, "context too long")) as stub:
        out = writer(stub, tmp_path).questions("e/0/0", TEXT, 3)
    assert out.failure == "http_400" and "context too long" in out.detail and stub.count == 1


def test_concurrency_is_bounded_and_order_kept(key, tmp_path):
    # each reply waits (10 s at most) for a second request to be in flight: with concurrency 2 the two
    # always meet, so two are in flight at once however slow the machine; a third would be counted too
    pair = threading.Barrier(2)

    def reply(request):
        try:
            pair.wait(timeout=10)
        except threading.BrokenBarrierError:  # never a partner: max_in_flight stays 1 and the test says so
            pass
        return Reply.ok([f"Q{len(request['messages'][1]['content'])}?"])

    with StubLLM(default=reply) as stub:
        contexts = [(f"e/0/{i}", TEXT + " x" * i) for i in range(6)]
        outs = writer(stub, tmp_path, concurrency=2).questions_for(contexts, 1)
    assert [o.context_id for o in outs] == [c for c, _ in contexts]
    assert stub.max_in_flight == 2 and stub.count == 6
    assert not pair.broken


@pytest.mark.parametrize("fmt, expected", [
    ("json_schema", "json_schema"),
    ("none", None),
])
def test_response_format_options(key, tmp_path, fmt, expected):
    with StubLLM() as stub:
        out = writer(stub, tmp_path, response_format=fmt).questions("e/0/0", TEXT, 2)
    assert out.failure is None and len(out.questions) == 2
    sent = stub.requests[0].get("response_format")
    if expected is None:
        assert sent is None
    else:
        assert sent["type"] == "json_schema"
        assert sent["json_schema"]["schema"]["required"] == ["questions"]


# -- the key ---------------------------------------------------------------------------------------

def test_missing_key_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(LLMError, match=KEY_ENV):
        OpenAIQuestionWriter(OpenAISettings(api_key_env=KEY_ENV), tmp_path)


def test_missing_key_with_base_url_sends_a_placeholder(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with StubLLM() as stub:
        out = writer(stub, tmp_path).questions("e/0/0", TEXT, 2)
    assert out.failure is None and stub.auth_headers[0] == "Bearer no-key"


def test_rejected_key_stops_without_showing_it(key, tmp_path):
    with StubLLM(default=lambda r: Reply.error(401, f"Incorrect API key provided: {SECRET}")) as stub:
        with pytest.raises(LLMError) as e:
            writer(stub, tmp_path).questions_for([("e/0/0", TEXT), ("e/0/1", TEXT + "!")], 2)
    assert KEY_ENV in str(e.value) and SECRET not in str(e.value)
    assert e.value.__suppress_context__  # a traceback does not show the client's error, which holds the body


def test_key_never_reaches_logs_or_files(key, tmp_path, caplog):
    # the server echoes the key in an error body, the worst case for a detail that gets logged
    script = [Reply.error(400, f"bad request from key {SECRET}"), Reply.error(500), Reply.ok(["What is X?"])]
    caplog.set_level(logging.DEBUG)  # every logger, the client's and httpx's included
    with StubLLM(script) as stub:
        w = writer(stub, tmp_path, concurrency=1)
        outs = w.questions_for([("e/0/0", TEXT), ("e/0/1", TEXT + " more")], 2)
    assert outs[0].failure == "http_400" and "***" in outs[0].detail
    assert all(SECRET not in (o.detail or "") for o in outs)
    assert caplog.records, "expected log records to check"
    assert SECRET not in caplog.text
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files, "expected cache files to check"
    for p in files:
        assert SECRET not in p.read_text(errors="replace"), p
