"""Fuzz a running pdserve HTTP API (dev server or PD router): no 5xx, no dropped connection.

    .venv/bin/python tools/fuzz_http.py --base-url http://127.0.0.1:8000 [--examples 200] [--seed 0] [--api-key KEY]

Two parts, each over one keep-alive connection, so a server that closes a connection
after an error is caught by the next request on it:

1. Hand-written cases for what an OpenAPI schema cannot express (``hand_cases``): broken
   UTF-8, a lone UTF-16 surrogate in every field of both request bodies (the field names
   are read from the server's ``/openapi.json``, so new fields are covered), huge numbers,
   deep nesting, wrong content types, duplicate keys, control characters, empty and 10 MB
   bodies, 10k stop strings, ``n`` and ``max_tokens`` at and past their limits (read from
   ``/v1/models``). Each has the status it must get, or the set it may get.
2. schemathesis over the server's ``/openapi.json``: ``--examples`` generated requests in
   each of its positive (schema-valid) and negative (schema-violating) modes, derandomized
   by ``--seed`` so a run is repeatable.

Every answer must be below 500; an error must be OpenAI's ``{"error": {message, type,
param, code}}``; a 429 must carry ``Retry-After``; a stream must end with ``data: [DONE]``
and hold no ``server_error`` event. After every hand-written case the server must still
complete a one-token request. Prints a report (cases, examples, answers by status) and
exits 1 when any of this failed. ``run_hand_cases`` / ``run_schemathesis`` are what
``tests/test_fuzz_http.py`` calls against servers it starts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from typing import Any, Iterable

import httpx

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ERROR_FIELDS = {"message", "type", "param", "code"}
SURROGATE = "a\ud800b"  # json.dumps writes it as the escape "a\\ud800b": valid JSON, not valid Unicode


@dataclasses.dataclass
class Case:
    name: str
    path: str
    body: bytes | None  # None: no body
    expect: frozenset[int]  # statuses it may get
    param: str | None = None  # the field a 400 must name
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    method: str = "POST"


@dataclasses.dataclass
class Report:
    """What a fuzz run saw; ``failures`` empty means it passed."""

    requests: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def merge(self, other: "Report") -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.failures += other.failures

    def summary(self) -> str:
        by_status = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return f"{self.requests} requests ({by_status}); 5xx: {self.server_errors}; failures: {len(self.failures)}"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: a lone surrogate travels as its \\u escape


# ---- the hand-written cases --------------------------------------------------------
def _request_fields(openapi: dict[str, Any], component: str) -> list[str]:
    """The body's fields as the server describes them (this checkout's models for a server that does not)."""
    described = openapi.get("components", {}).get("schemas", {}).get(component)
    if described is None:
        from serving import protocol

        return sorted(getattr(protocol, component).model_fields)
    return sorted(described["properties"])


def _surrogate_cases(openapi: dict[str, Any], model: str, chat_base: dict, completion_base: dict) -> list[Case]:
    """A lone surrogate in every top-level field of both bodies, in nested strings and in keys."""
    cases = []
    for path, component, base in ((COMPLETIONS, "CompletionRequest", completion_base),
                                  (CHAT, "ChatCompletionRequest", chat_base)):
        for field in _request_fields(openapi, component):
            cases.append(Case(f"surrogate in {path} {field}", path, _json({**base, field: SURROGATE}),
                              frozenset({400}), field))
        cases.append(Case(f"surrogate in an unknown field of {path}", path, _json({**base, "x_extra": SURROGATE}),
                          frozenset({400}), "x_extra"))
        cases.append(Case(f"surrogate in a key of {path}", path, _json({**base, "\udc80": 1}), frozenset({400})))
    nested = [
        ("message content", CHAT, {**chat_base, "messages": [{"role": "user", "content": SURROGATE}]},
         "messages[0].content"),
        ("message name", CHAT, {**chat_base, "messages": [{"role": "user", "content": "x", "name": SURROGATE}]},
         "messages[0].name"),
        ("content part text", CHAT,
         {**chat_base, "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
         "messages[0].content[0].text"),
        ("second message", CHAT, {**chat_base, "messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "\udfff"}]},
         "messages[1].content"),
        ("stop list", CHAT, {**chat_base, "stop": ["ok", SURROGATE]}, "stop[1]"),
        ("chat_template_kwargs value", CHAT, {**chat_base, "chat_template_kwargs": {"x": SURROGATE}},
         "chat_template_kwargs.x"),
        ("chat_template_kwargs key", CHAT, {**chat_base, "chat_template_kwargs": {"\ud800": 1}},
         "chat_template_kwargs"),
        ("prompt list", COMPLETIONS, {**completion_base, "prompt": ["ok", SURROGATE]}, "prompt[1]"),
        ("model", COMPLETIONS, {**completion_base, "model": "\ud800"}, "model"),
    ]
    cases += [Case(f"surrogate in {name}", path, _json(body), frozenset({400}), param)
              for name, path, body, param in nested]
    # a surrogate *pair* is one valid code point; \ud800 spelled in upper case is still a lone one
    cases.append(Case("escaped surrogate pair (an emoji) is fine", COMPLETIONS,
                      _json({**completion_base, "prompt": "smile \U0001F600"}), frozenset({200})))
    cases.append(Case("upper-case surrogate escape", COMPLETIONS,
                      json.dumps({**completion_base, "prompt": "PLACEHOLDER"}).replace("PLACEHOLDER", "\\uD83D")
                      .encode(), frozenset({400}), "prompt"))
    return cases


def hand_cases(openapi: dict[str, Any], model: str, max_model_len: int) -> list[Case]:
    """Every hand-written case for a server serving ``model`` with context ``max_model_len``."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    completion = {"model": model, "prompt": "Hello", "max_tokens": 2}
    ok, bad = frozenset({200}), frozenset({400})
    cases = _surrogate_cases(openapi, model, chat, completion)
    cases += [
        Case("completions without prompt", COMPLETIONS, _json({"model": model, "max_tokens": 2}), bad, "prompt"),
        Case("completions without prompt, streaming", COMPLETIONS, _json({"max_tokens": 2, "stream": True}), bad,
             "prompt"),
        Case("completions with an empty object", COMPLETIONS, b"{}", bad, "prompt"),
        Case("chat without messages", CHAT, _json({"model": model}), bad, "messages"),
        # broken UTF-8
        Case("invalid UTF-8 byte", COMPLETIONS, b'{"prompt": "\xff"}', bad),
        Case("overlong UTF-8", COMPLETIONS, b'{"prompt": "\xc0\xaf"}', bad),
        Case("UTF-8 encoded surrogate (CESU-8)", COMPLETIONS, b'{"prompt": "\xed\xa0\x80"}', bad),
        Case("truncated multi-byte character", COMPLETIONS, b'{"prompt": "\xe2\x82"}', bad),
        Case("UTF-16 body", COMPLETIONS, json.dumps(completion).encode("utf-16"), bad),
        # huge numbers
        Case("max_tokens 10^30", COMPLETIONS, _json({**completion, "max_tokens": 10**30}), bad, "max_tokens"),
        Case("n -10^30", CHAT, _json({**chat, "n": -10**30}), bad, "n"),
        Case("temperature 1e400 (inf)", CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}',
             bad, "temperature"),
        Case("top_p -1e400", COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 1, "top_p": -1e400}', bad, "top_p"),
        Case("5000-digit integer", COMPLETIONS, b'{"prompt": "Hi", "seed": ' + b"9" * 5000 + b"}", bad),
        Case("seed 2^64", COMPLETIONS, _json({**completion, "seed": 2**64}), bad, "seed"),
        Case("top_k 2^31", COMPLETIONS, _json({**completion, "top_k": 2**31}), bad, "top_k"),
        Case("top_k 10^20", COMPLETIONS, _json({**completion, "top_k": 10**20}), bad, "top_k"),
        Case("stop token id 10^20", COMPLETIONS, _json({**completion, "stop_token_ids": [10**20], "min_tokens": 1}),
             bad, "stop_token_ids"),
        Case("priority 10^30", COMPLETIONS, _json({**completion, "priority": 10**30}), ok),
        Case("seed -2^63", COMPLETIONS, _json({**completion, "seed": -2**63, "temperature": 1.0}), ok),
        Case("seed 2^64-1, n 3", COMPLETIONS, _json({**completion, "seed": 2**64 - 1, "temperature": 1.0, "n": 3}), ok),
        Case("top_k 2^31-1", COMPLETIONS, _json({**completion, "top_k": 2**31 - 1, "temperature": 1.0}), ok),
        Case("top_p 5e-324 (0 in fp32)", COMPLETIONS, _json({**completion, "top_p": 5e-324, "temperature": 100}), ok),
        Case("temperature 5e-324", COMPLETIONS, _json({**completion, "temperature": 5e-324}), ok),
        Case("min_p 1", COMPLETIONS, _json({**completion, "min_p": 1.0, "temperature": 1.0}), ok),
        Case("penalties at their bounds", COMPLETIONS,
             _json({**completion, "repetition_penalty": 2.0, "presence_penalty": -2.0, "frequency_penalty": 2.0}), ok),
        Case("repetition_penalty 5e-324", COMPLETIONS, _json({**completion, "repetition_penalty": 5e-324}), ok),
        Case("stop token id 2^31-1 with min_tokens", COMPLETIONS,
             _json({**completion, "stop_token_ids": [2**31 - 1], "min_tokens": 2}), ok),
        # nesting
        Case("100k nested lists", COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", bad),
        Case("100k nested objects", CHAT, b'{"x": ' + b'{"x": ' * 100_000 + b"1" + b"}" * 100_001, bad),
        *(Case(f"chat_template_kwargs sets {name}", CHAT, _json({**chat, "chat_template_kwargs": {name: 1}}), bad,
               f"chat_template_kwargs.{name}") for name in ("messages", "add_generation_prompt", "self")),
        Case("nested template kwargs", CHAT, _json({**chat, "chat_template_kwargs": {"x": _nest(200)}}), ok),
        # content types
        Case("text/plain", COMPLETIONS, _json(completion), frozenset({415}), headers={"Content-Type": "text/plain"}),
        Case("form-encoded", CHAT, b"messages=hi", frozenset({415}),
             headers={"Content-Type": "application/x-www-form-urlencoded"}),
        Case("multipart", COMPLETIONS, b"--x\r\n\r\n--x--", frozenset({415}),
             headers={"Content-Type": "multipart/form-data; boundary=x"}),
        Case("no content type", COMPLETIONS, _json(completion), ok, headers={"Content-Type": ""}),
        Case("+json media type", COMPLETIONS, _json(completion), ok, headers={"Content-Type": "application/foo+json"}),
        # duplicate keys: the last one wins, as in every common JSON parser
        Case("duplicate key, last valid", COMPLETIONS, b'{"prompt": 5, "prompt": "Hi", "max_tokens": 1}', ok),
        Case("duplicate key, last invalid", COMPLETIONS, b'{"prompt": "Hi", "prompt": 5, "max_tokens": 1}', bad,
             "prompt"),
        # control characters
        Case("control characters in the prompt", COMPLETIONS,
             _json({**completion, "prompt": "\x00\x01\x07\x08\x1b\x1f\x7f\u2028\ufeff"}), ok),
        Case("NUL in message content", CHAT, _json({**chat, "messages": [{"role": "user", "content": "a\u0000b"}]}), ok),
        Case("control characters in stop", CHAT, _json({**chat, "stop": ["\u0000", "\n\r\t"]}), ok),
        Case("raw control character in a JSON string", COMPLETIONS, b'{"prompt": "a\x01b"}', bad),
        Case("NUL in the model name", COMPLETIONS, _json({**completion, "model": "x\u0000"}), frozenset({404}),
             "model"),
        # empty and large bodies
        Case("empty body", COMPLETIONS, b"", bad),
        Case("whitespace body", CHAT, b"  \n ", bad),
        Case("10 MB body", COMPLETIONS, _json({**completion, "prompt": "a" * 10_000_000}), frozenset({413})),
        # stop lists
        Case("10k stop strings", CHAT, _json({**chat, "stop": [f"s{i}" for i in range(10_000)]}), bad, "stop"),
        Case("16 stop strings of 256 characters", CHAT, _json({**chat, "stop": [f"{i:03}" + "z" * 253 for i in range(16)]}),
             ok),
        Case("a stop string of 257 characters", CHAT, _json({**chat, "stop": "z" * 257}), bad, "stop"),
        # n and max_tokens at and past their limits
        Case("n 64", COMPLETIONS, _json({**completion, "n": 64, "max_tokens": 1, "temperature": 1.0}), ok),
        Case("n 65", COMPLETIONS, _json({**completion, "n": 65, "max_tokens": 1}), bad, "n"),
        Case("max_tokens up to the context", COMPLETIONS,
             _json({"prompt": [65], "max_tokens": max_model_len - 1, "ignore_eos": True}), ok),
        Case("max_tokens one past the context", COMPLETIONS, _json({"prompt": [65], "max_tokens": max_model_len}),
             bad, "max_tokens"),
        Case("prompt up to the context", COMPLETIONS, _json({"prompt": [65] * (max_model_len - 1), "max_tokens": 1}),
             ok),
        Case("prompt filling the context", COMPLETIONS, _json({"prompt": [65] * max_model_len, "max_tokens": 1}),
             bad, "prompt"),
        Case("n 8 x max_tokens up to the context", COMPLETIONS,
             _json({"prompt": [65], "n": 8, "max_tokens": max_model_len - 1, "ignore_eos": True,
                    "temperature": 1.0}), ok),
        Case("n 64 x 2 tokens, streamed", COMPLETIONS,
             _json({**completion, "n": 64, "max_tokens": 2, "stream": True, "temperature": 1.0}), ok),
        Case("logprobs 20 with echo", COMPLETIONS, _json({**completion, "logprobs": 20, "echo": True}), ok),
        Case("top_logprobs 20", CHAT, _json({**chat, "logprobs": True, "top_logprobs": 20}), ok),
        # methods and paths
        Case("GET on a POST route", CHAT, None, frozenset({405}), method="GET"),
        Case("unknown route", "/v1/embeddings", _json(chat), frozenset({404})),
        Case("model id with odd bytes", "/v1/models/%ED%A0%80%00", None, frozenset({404}), method="GET"),
    ]
    return cases


def _nest(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"x": [value]}
    return value


# ---- checks shared by both parts ---------------------------------------------------
def check_answer(status: int, headers: Any, text: str, content_type: str) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    problems = []
    if status >= 500:
        problems.append(f"server error {status}: {text[:300]}")
    if "Traceback" in text or 'File "' in text:
        problems.append("the answer holds a traceback")
    if status >= 400:
        try:
            error = json.loads(text)["error"]
            if set(error) != ERROR_FIELDS or not isinstance(error["message"], str):
                problems.append(f"error body is not OpenAI's shape: {text[:200]}")
        except (ValueError, KeyError, TypeError):
            problems.append(f"error body is not OpenAI JSON: {text[:200]}")
    if status == 429 and "retry-after" not in {k.lower() for k in headers}:
        problems.append("429 without Retry-After")
    if status == 200 and content_type.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            problems.append("stream does not end with data: [DONE]")
        if any('"server_error"' in e for e in events):
            problems.append(f"stream holds a server error event: {text[-300:]}")
    return problems


class _Connection:
    """One keep-alive client that notices when the server closed its connection without saying so."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float):
        self.client = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)
        self._port: int | None = None
        self._may_close = False  # the last answer said "Connection: close"
        self._last = ""

    def send(self, label: str, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response | None, list[str]]:
        """(answer or None, problems): no answer, or the request went over a new connection unannounced."""
        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            self._port = None
            return None, [f"no answer ({type(e).__name__}: {e})"]
        problems = []
        may_close = r.headers.get("connection", "").lower() == "close"
        try:
            port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
        except OSError:  # the socket is gone already: the server closed it right after answering
            port = None
            if not may_close:
                problems.append("the server closed the keep-alive connection after answering, without "
                                "'Connection: close'")
        if None not in (self._port, port) and port != self._port and not self._may_close:
            problems.append(f"the server closed the keep-alive connection after {self._last!r} without "
                            "'Connection: close'")
        self._port, self._last, self._may_close = port, label, may_close
        return r, problems

    def close(self) -> None:
        self.client.close()


def run_hand_cases(base_url: str, cases: Iterable[Case], headers: dict[str, str] | None = None,
                   timeout: float = 300.0) -> Report:
    report = Report()
    conn = _Connection(base_url, headers or {}, timeout)
    try:
        for case in cases:
            report.requests += 1
            send_headers = {k: v for k, v in {"Content-Type": "application/json", **case.headers}.items() if v}
            r, problems = conn.send(case.name, case.method, case.path, content=case.body, headers=send_headers)
            report.statuses[r.status_code if r is not None else -1] += 1
            if r is not None:
                problems += check_answer(r.status_code, r.headers, r.text, r.headers.get("content-type", ""))
                if r.status_code not in case.expect:
                    problems.append(f"status {r.status_code}, expected {sorted(case.expect)}: {r.text[:200]}")
                elif case.param is not None and r.status_code == 400 and r.json()["error"]["param"] != case.param:
                    problems.append(f"error names {r.json()['error']['param']!r}, expected {case.param!r}")
            after, after_problems = conn.send(f"the request after {case.name}", "POST", COMPLETIONS,
                                              json={"prompt": "Hi", "max_tokens": 1})
            if after is not None and after.status_code != 200:
                after_problems.append(f"got {after.status_code}: {after.text[:200]}")
            problems += [f"the next request: {p}" for p in after_problems]
            report.failures += [f"{case.name}: {p}" for p in problems]
    finally:
        conn.close()
    return report


# ---- schemathesis ---------------------------------------------------------------
def run_schemathesis(base_url: str, examples: int, seed: int = 0, headers: dict[str, str] | None = None,
                     timeout: float = 300.0) -> Report:
    """``examples`` generated requests per mode (positive, negative) from the server's ``/openapi.json``."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection, status_code_conformance

    from schemathesis.config import SchemathesisConfig

    # read streams to their end (not to schemathesis' default event cap); never retry a failed request
    config = SchemathesisConfig.from_dict({"max-stream-events": 1_000_000, "request-retries": 0})
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", config=config, headers=headers or {})
    report = Report()

    class WatchedSession(requests.Session):
        """schemathesis resends a request the server dropped unanswered; count the drop as a failure first."""

        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
            try:
                return super().request(method, url, *args, **kwargs)
            except requests.ConnectionError as e:
                report.failures.append(f"{method} {url}: connection dropped ({e})")
                raise

    with WatchedSession() as session:
        session.headers.update(headers or {})
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            checks = [not_a_server_error, status_code_conformance]
            if mode == GenerationMode.NEGATIVE:
                checks.append(negative_data_rejection)

            @hypothesis_seed(seed)
            @settings(max_examples=examples, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                      report_multiple_bugs=False)
            @given(case=schema.as_strategy(mode))
            def one(case: Any) -> None:
                report.requests += 1
                try:
                    response = case.call(base_url=base_url, session=session, timeout=timeout)
                except requests.RequestException as e:
                    report.statuses[-1] += 1
                    report.failures.append(f"{mode.value} {case.method} {case.path}: no answer ({e})")
                    return
                report.statuses[response.status_code] += 1
                content_type = response.headers.get("content-type") or [""]  # schemathesis: name -> list
                problems = check_answer(response.status_code, response.headers, response.text, content_type[0])
                try:
                    case.validate_response(response, checks=checks)
                except AssertionError as e:  # schemathesis raises its failures as AssertionError subclasses
                    problems.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                if problems:
                    body = (case.body if isinstance(case.body, (str, bytes)) else json.dumps(case.body, default=str))
                    report.failures += [f"{mode.value} {case.method} {case.path} {str(body)[:300]}: {p}"
                                        for p in problems]

            one()
    return report


def server_description(base_url: str, headers: dict[str, str] | None = None) -> tuple[dict, str, int]:
    """(openapi, model id, max_model_len) of the server at ``base_url``."""
    with httpx.Client(base_url=base_url, timeout=30, headers=headers or {}) as client:
        openapi = client.get("/openapi.json").raise_for_status().json()
        card = client.get("/v1/models").raise_for_status().json()["data"][0]
    return openapi, card["id"], card["max_model_len"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (no /v1)")
    parser.add_argument("--examples", type=int, default=200, help="schemathesis examples per mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--skip-schemathesis", action="store_true")
    args = parser.parse_args(argv)
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    openapi, model, max_model_len = server_description(base, headers)
    cases = hand_cases(openapi, model, max_model_len)
    hand = run_hand_cases(base, cases, headers)
    print(f"hand-written cases: {len(cases)} cases, {hand.summary()}")
    total = Report()
    total.merge(hand)
    if not args.skip_schemathesis:
        generated = run_schemathesis(base, args.examples, args.seed, headers)
        print(f"schemathesis (positive + negative, {args.examples} examples each, seed {args.seed}): "
              f"{generated.summary()}")
        total.merge(generated)
    for failure in total.failures:
        print("FAIL", failure)
    print("PASS" if not total.failures else "FAIL", total.summary())
    return 0 if not total.failures else 1


if __name__ == "__main__":
    sys.exit(main())
