"""The OpenAI-compatible question backend: the official ``openai`` client, with our own retry policy.

Works against api.openai.com or any OpenAI-compatible ``base_url`` (vLLM, Ollama, llama.cpp server).
What the client does not do for us, and this module does:

- retries: the client is built with ``max_retries=0``; we retry 429, 5xx, timeouts and connection
  errors at most ``max_retries`` times per request, and the waits between tries add up to at most
  ``max_wait_s`` (a ``Retry-After`` header is honoured but clipped to what is left of that budget;
  exponential backoff otherwise). The client alone sleeps for whatever ``Retry-After`` says.
- bounded concurrency: ``concurrency`` requests in flight (a thread pool; the client is thread-safe).
- replies: we ask for ``{"questions": [...]}`` (``response_format`` json_object, json_schema, or
  none), parse tolerantly (a JSON object, a bare JSON array, a truncated JSON array, or a numbered /
  bulleted list: small models ignore "reply in JSON"), validate against :data:`QUESTIONS_SCHEMA`,
  and re-ask a bounded number of times (``max_bad_replies``) before counting the context as skipped.
- a disk cache: every reply is stored under ``cache_dir`` keyed by a hash of the full request (model,
  messages, temperature, max_tokens, response_format; never the key, nor the base_url, which changes
  when a server moves to another node), written atomically, so a rerun after a crash repeats no call.
- tokens: prompt and completion tokens of live calls, and of replies served from the cache.

The key comes only from the environment variable named by ``api_key_env``; it never reaches a log,
an output, a report, a cache file or an exception message (everything that may echo it is redacted).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from tqdm import tqdm

from moegate.config import defaults as config_defaults
from moegate.config import looks_like_secret
from moegate.errors import MoegateError
from moegate.io import write_json

log = logging.getLogger(__name__)

QUESTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["questions"],
    "properties": {
        "questions": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "minLength": 1, "pattern": r"\S"},
        }
    },
}

# OpenAI's strict structured outputs accept only a subset of JSON Schema: no minLength/pattern.
_STRICT_SCHEMA = {
    "type": "object",
    "properties": {"questions": {"type": "array", "items": {"type": "string"}}},
    "required": ["questions"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You write the questions that students taking a course ask their teaching assistant. Given an "
    "excerpt of the course material, write questions that a student might ask and that the excerpt "
    "answers. Vary them: definitions, how and why questions, comparisons, applications, and short "
    "keyword searches. Each question must stand on its own: never mention 'the excerpt', 'the text' "
    "or 'the passage'. "
    'Reply only with a JSON object of the form {"questions": ["...", "..."]}.'
)

PLACEHOLDER_KEY = "no-key"  # sent to a base_url server that needs no key when the variable is unset
_BACKOFF_BASE_S = 0.5
_BACKOFF_CAP_S = 30.0
_ECHO_CHARS = 2000  # how much of a bad reply is shown back to the model when re-asking


class LLMError(MoegateError, RuntimeError):
    """A fault that every request would hit (no key, key rejected, unknown model): stop the stage."""


class _NotACompletion(Exception):
    """An HTTP 200 whose body is not a chat completion (treated like a 5xx: retried, then counted)."""


class BadReply(ValueError):
    """A reply that does not hold a list of questions; the message says what was wrong."""


_OPENAI = config_defaults("synthesize.openai")


@dataclass(frozen=True)
class OpenAISettings:
    """``synthesize.openai`` of the config (see the schema for each key's meaning and its default)."""

    model: str = _OPENAI["model"]
    base_url: str | None = _OPENAI["base_url"]
    api_key_env: str = _OPENAI["api_key_env"]
    temperature: float = float(_OPENAI["temperature"])
    max_tokens: int = int(_OPENAI["max_tokens"])
    concurrency: int = int(_OPENAI["concurrency"])
    max_retries: int = int(_OPENAI["max_retries"])
    max_wait_s: float = float(_OPENAI["max_wait_s"])
    timeout_s: float = float(_OPENAI["timeout_s"])
    response_format: str = _OPENAI["response_format"]
    max_bad_replies: int = int(_OPENAI["max_bad_replies"])

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> OpenAISettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in section.items() if k in known})


@dataclass
class Outcome:
    """What one context got: its questions, or the reason it was skipped."""

    context_id: str
    questions: list[str] = field(default_factory=list)
    # rate_limited | server_error | timeout | connection_error | malformed_response | http_4xx | bad_reply
    failure: str | None = None
    detail: str = ""
    calls: int = 0  # HTTP requests sent
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    waited_s: float = 0.0
    bad_replies: int = 0


# -- parsing ----------------------------------------------------------------------------------------

_LIST_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)\]:]|[-*•]|Q\d{1,3}[.):]|Question\s*\d{1,3}[.):]?)\s+(.+?)\s*$",
                        re.IGNORECASE)
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_questions(text: str | None) -> list[str]:
    """The questions in a model's reply; raises :class:`BadReply` when there are none.

    Accepts ``{"questions": [...]}``, a bare JSON array, either inside a code fence or surrounded by
    chatter, a JSON reply cut off at the token limit (the complete strings are kept), or a numbered /
    bulleted list. The result is validated against :data:`QUESTIONS_SCHEMA`.
    """
    if text is None or not text.strip():
        raise BadReply("empty reply")
    body = re.sub(r"^```(?:json)?\s*|\s*```\s*$", "", text.strip(), flags=re.IGNORECASE)
    obj = _first_json(body)
    if obj is not None:
        if isinstance(obj, list):
            obj = {"questions": obj}
        if not isinstance(obj, dict):
            raise BadReply(f"JSON reply is a {type(obj).__name__}, expected an object with 'questions'")
        questions = obj.get("questions")
    elif body.lstrip().startswith(("{", "[")):
        questions = _salvage_truncated(body)
        if questions is None:
            raise BadReply("reply is not valid JSON and holds no complete question string")
    else:
        questions = [m.group(1) for line in body.splitlines() if (m := _LIST_ITEM.match(line))]
        if not questions:  # plain lines that are questions
            questions = [ln.strip() for ln in body.splitlines() if ln.strip().endswith("?")]
        if not questions:
            raise BadReply("reply is neither JSON nor a list of questions")
    errors = sorted(jsonschema.Draft202012Validator(QUESTIONS_SCHEMA).iter_errors({"questions": questions}),
                    key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "reply"
        raise BadReply(f"off-schema reply at {where}: {errors[0].message[:200]}")
    return [_tidy(q) for q in questions if _tidy(q)]


def _first_json(body: str) -> Any | None:
    """The reply as JSON, or the first JSON object/array embedded in it; None when there is none."""
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[{\[]", body):
        try:
            obj, _ = decoder.raw_decode(body, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, (dict, list)) and obj:
            return obj
    return None


def _salvage_truncated(body: str) -> list[str] | None:
    """Complete strings of a JSON reply cut off at max_tokens ('{"questions": ["a?", "b?", "c')."""
    m = re.search(r'"questions"\s*:\s*\[', body) or re.match(r"\s*\[", body)
    if not m:
        return None
    rest = body[m.end():]
    found = []
    for s in _JSON_STRING.finditer(rest):
        if not re.match(r"\s*[,\]]", rest[s.end():]):
            break  # the string is cut off, or it is a key of a nested object: stop at the last clean item
        found.append(json.loads(f'"{s.group(1)}"'))
    return found or None


def _tidy(question: str) -> str:
    q = re.sub(r"\s+", " ", str(question)).strip().strip('"“”').strip()
    return re.sub(r"^(?:\d{1,3}[.)]|[-*•])\s+", "", q)


# -- the disk cache ---------------------------------------------------------------------------------


def request_key(request: dict[str, Any]) -> str:
    """sha256 of the request's canonical JSON: what a reply is cached under."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class ReplyCache:
    """Replies on disk, one JSON file per request hash (``ab/abcdef....json``), written atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # rare with atomic writes: a miss
            log.warning("%s: unreadable cache entry (%s); asking again", path, e)
            return None
        return entry.get("reply")

    def put(self, key: str, request: dict[str, Any], reply: dict[str, Any]) -> None:
        write_json(self.path(key), {"key": key, "request": request, "reply": reply, "created": time.time()})


# -- the backend ------------------------------------------------------------------------------------


class _Redactor:
    """Removes the key from any text that could carry it (server error bodies may echo it)."""

    def __init__(self, secret: str | None):
        self.secret = secret if secret and secret != PLACEHOLDER_KEY else None

    def __call__(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text


def key_variable(settings: OpenAISettings) -> str:
    """``$api_key_env`` as messages may show it: the name, or a placeholder when the name looks like a key
    (config validation rejects such a value; this keeps settings built by hand from echoing one)."""
    return "<synthesize.openai.api_key_env>" if looks_like_secret(settings.api_key_env) else settings.api_key_env


def resolve_api_key(settings: OpenAISettings) -> str:
    """The key from ``$api_key_env``; a placeholder when unset but a base_url server may need none."""
    value = os.environ.get(settings.api_key_env, "").strip()
    if value:
        return value
    if settings.base_url:
        log.info("environment variable %s is not set: sending a placeholder key to %s "
                 "(fine for a server started without a key)", key_variable(settings), settings.base_url)
        return PLACEHOLDER_KEY
    raise LLMError(
        f"synthesize.openai: environment variable {key_variable(settings)} is not set; export the API key "
        f"there (keys are read only from the environment), or set synthesize.openai.base_url to a server "
        f"that needs none"
    )


def _retry_after(response: Any) -> float | None:
    """Seconds asked for by a Retry-After (or retry-after-ms) header; None when absent or unreadable."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAIQuestionWriter:
    """Asks an OpenAI-compatible chat model for questions about contexts; see the module docstring."""

    name = "openai"

    def __init__(self, settings: OpenAISettings, cache_dir: str | os.PathLike):
        import openai

        self.settings = settings
        self.model = settings.model
        self.cache = ReplyCache(cache_dir)
        key = resolve_api_key(settings)
        self._redact = _Redactor(key)
        self._openai = openai
        # max_retries=0: the retry and wait policy is ours (the client would sleep out any Retry-After)
        self._client = openai.OpenAI(api_key=key, base_url=settings.base_url, max_retries=0,
                                     timeout=settings.timeout_s)
        self._where = settings.base_url or "api.openai.com"
        if not log.isEnabledFor(logging.DEBUG):  # the HTTP client logs a line per request at INFO
            for name in ("httpx", "httpx2"):
                logging.getLogger(name).setLevel(logging.WARNING)

    # -- requests --
    def build_request(self, text: str, n: int, bad_reply: str | None = None,
                      attempt: int = 0) -> dict[str, Any]:
        """The chat request for one context (what is sent, and what the cache key hashes).

        ``bad_reply`` and ``attempt`` (1, 2, ...) make a re-ask after an unreadable reply; the attempt
        number keeps re-asks distinct, so a cached bad reply is not served to the next re-ask.
        """
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f'Course material:\n"""\n{text}\n"""\n\nWrite {n} questions.'},
        ]
        if bad_reply is not None:  # re-ask: show the model its reply and what we need instead
            messages += [
                {"role": "assistant", "content": bad_reply[:_ECHO_CHARS]},
                {"role": "user",
                 "content": f'That reply could not be read (try {attempt + 1}). Reply only with '
                            f'{{"questions": ["...", "..."]}} holding {n} questions as strings.'},
            ]
        request: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }
        fmt = self.settings.response_format
        if fmt == "json_object":
            request["response_format"] = {"type": "json_object"}
        elif fmt == "json_schema":
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "questions", "strict": True, "schema": _STRICT_SCHEMA},
            }
        return request

    def questions(self, context_id: str, text: str, n: int) -> Outcome:
        """Ask for ``n`` questions about one context; bad replies are re-asked, then skipped."""
        outcome = Outcome(context_id)
        bad: str | None = None
        for attempt in range(self.settings.max_bad_replies + 1):
            request = self.build_request(text, n, bad_reply=bad, attempt=attempt)
            key = request_key(request)
            reply = self.cache.get(key)
            if reply is not None:
                outcome.cache_hits += 1
                usage = reply.get("usage") or {}
                outcome.cached_prompt_tokens += int(usage.get("prompt_tokens") or 0)
                outcome.cached_completion_tokens += int(usage.get("completion_tokens") or 0)
            else:
                outcome.cache_misses += 1
                reply = self._call(request, outcome)
                if reply is None:
                    return outcome  # failure and detail set by _call
                self.cache.put(key, request, reply)
            try:
                outcome.questions = parse_questions(reply.get("content"))[:n]
                outcome.failure, outcome.detail = None, ""  # an earlier bad reply was repaired
                return outcome
            except BadReply as e:
                outcome.bad_replies += 1
                outcome.failure, outcome.detail = "bad_reply", str(e)
                bad = reply.get("content") or ""
                log.debug("%s: bad reply (%s); asking again", context_id, e)
        return outcome

    def _call(self, request: dict[str, Any], outcome: Outcome) -> dict[str, Any] | None:
        """One request under our retry policy: the reply, or None with ``outcome.failure`` set."""
        oa = self._openai
        s = self.settings
        tries = 0
        while True:
            retry_after: float | None = None
            try:
                outcome.calls += 1
                completion = self._client.chat.completions.create(**request)
                if not hasattr(completion, "choices"):  # a 200 that is not JSON: a proxy's page, say
                    raise _NotACompletion(f"HTTP 200 but not a chat completion: {str(completion)[:80]!r}")
                choice = completion.choices[0] if completion.choices else None
                usage = completion.usage
                reply = {
                    "content": choice.message.content if choice is not None else None,
                    "finish_reason": choice.finish_reason if choice is not None else None,
                    "model": completion.model,
                    "usage": {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                              "completion_tokens": getattr(usage, "completion_tokens", 0) or 0},
                }
                outcome.prompt_tokens += reply["usage"]["prompt_tokens"]
                outcome.completion_tokens += reply["usage"]["completion_tokens"]
                return reply
            except (oa.AuthenticationError, oa.PermissionDeniedError) as e:
                raise LLMError(f"{self._where}: HTTP {e.status_code}: the server rejected the API key "
                               f"from ${key_variable(s)}") from None
            except oa.NotFoundError as e:
                raise LLMError(f"{self._where}: HTTP 404 for model {s.model!r}: "
                               f"{self._redact(_message(e))}") from None
            except oa.RateLimitError as e:
                reason, retry_after = "rate_limited", _retry_after(e.response)
                detail = f"HTTP 429{_asked(retry_after)}"
            except oa.APITimeoutError:
                reason, detail = "timeout", f"no reply within timeout_s={s.timeout_s}"
            except oa.APIConnectionError as e:
                reason, detail = "connection_error", self._redact(_message(e))
            except (json.JSONDecodeError, _NotACompletion) as e:
                reason, detail = "malformed_response", self._redact(_message(e))
            except oa.APIStatusError as e:
                if e.status_code < 500:  # 400, 413, 422...: the same request would fail again
                    outcome.failure = f"http_{e.status_code}"
                    outcome.detail = self._redact(f"HTTP {e.status_code}: {_message(e)}")
                    log.warning("%s: %s", outcome.context_id, outcome.detail)
                    return None
                reason, retry_after = "server_error", _retry_after(e.response)
                detail = f"HTTP {e.status_code}{_asked(retry_after)}"
            tries += 1
            left = s.max_wait_s - outcome.waited_s
            delay = retry_after if retry_after is not None else self._backoff(tries)
            if tries > s.max_retries or (left <= 0 and delay > 0):
                outcome.failure = reason
                outcome.detail = (f"{detail}; gave up after {tries} tries and "
                                  f"{outcome.waited_s:.1f} s of waiting")
                log.warning("%s: %s", outcome.context_id, outcome.detail)
                return None
            delay = min(delay, left)  # Retry-After honoured, but never past our budget
            log.info("%s: %s; retry %d/%d in %.1f s", outcome.context_id, detail, tries, s.max_retries, delay)
            time.sleep(delay)
            outcome.waited_s += delay

    @staticmethod
    def _backoff(tries: int) -> float:
        # jitter spreads the retries of concurrent workers that failed together
        return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (tries - 1)) * random.uniform(0.75, 1.25)

    def questions_for(self, contexts: list[tuple[str, str]], n: int) -> list[Outcome]:
        """Outcomes for ``(context_id, text)`` pairs, in input order, ``concurrency`` requests at a time."""
        results: dict[str, Outcome] = {}
        pool = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="llm")
        try:
            futures = {pool.submit(self.questions, cid, text, n): cid for cid, text in contexts}
            for fut in tqdm(as_completed(futures), total=len(futures), desc="questions", unit="context",
                            disable=None):
                results[futures[fut]] = fut.result()  # an LLMError stops the stage here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[cid] for cid, _ in contexts]

    def close(self) -> None:
        self._client.close()


def _asked(retry_after: float | None) -> str:
    return f" (Retry-After {retry_after:g} s)" if retry_after is not None else ""


def _message(error: Exception) -> str:
    """A short, single-line description of a client error (servers may send pages of HTML)."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return re.sub(r"\s+", " ", str(text))[:300]
