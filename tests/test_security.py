"""Security defaults (issue #19 item 4), each checked by behaviour and, where a reviewer would
grep for it, by reading the source:

* the API key is compared with ``hmac.compare_digest`` on every route but the open probes
  (the router's ``/pools`` and any route added on top of the app included);
* request size, prompt length, ``n``, ``max_tokens`` and stop lists are limited (4xx);
* chat templates run sandboxed: an attribute escape fails cleanly, message text is data;
* servers bind loopback unless told otherwise;
* nothing on the request path unpickles, unmarshals or evaluates client data, and the
  API layer never touches Ray objects;
* a 500 (HTTP, SSE event, gRPC INTERNAL) names the exception type only: no message, no traceback.
"""

from __future__ import annotations

import ast
import hmac
import json
import os
import pathlib
from typing import AsyncIterator

import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from engine.outputs import GenerateRequest, RequestOutput
from engine.sampling_params import MAX_N, MAX_STOP_STRINGS
from engine.tokenizer import ChatTemplateError, load_tokenizer
from fake_engine import FakeEngine, make_model_dir, make_tokenizer, running_server
from serving import openai_api
from serving.openai_api import DEFAULT_MAX_BODY_BYTES, OPEN_PATHS, build_app

REPO = pathlib.Path(__file__).resolve().parent.parent
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("model")))


def _python_files(*packages: str) -> list[pathlib.Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


# ---- the API key --------------------------------------------------------------------------
def _routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                out.append((method, route.path.replace("{model_id:path}", "some-model")))
    return out


def test_every_route_but_the_open_ones_needs_the_key(tok, monkeypatch):
    app = build_app(FakeEngine(tok), tok, api_key=KEY)

    @app.post("/admin/drain")  # a route added on top (as the router adds its own) is protected too
    async def drain() -> dict:
        return {"drained": True}

    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(openai_api.hmac, "compare_digest", spy)
    routes = _routes(app)
    protected = [(m, p) for m, p in routes if p not in OPEN_PATHS]
    assert {p for _, p in protected} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/drain"}
    with TestClient(app) as c:
        for method, path in protected:
            for auth in (None, "Bearer wrong", "Bearer " + KEY[:-1], "Basic " + KEY, KEY, "Bearer " + KEY + "x"):
                r = c.request(method, path, headers={"Authorization": auth} if auth else {})
                assert r.status_code == 401, (method, path, auth)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            compared.clear()
            r = c.request(method, path, headers={"Authorization": "Bearer " + KEY},
                          json={"prompt": "Hi", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code != 401, (method, path)
            assert compared == [KEY.encode()], (method, path)  # went through compare_digest
        for method, path in routes:
            if path in OPEN_PATHS:
                assert c.request(method, path).status_code == 200, path  # probes need no secret
    assert all(path in {"/health", "/metrics", "/version"} or "doc" in path or "openapi" in path
               for path in OPEN_PATHS)


def test_router_admin_routes_need_the_key(tok):
    from router.app import build_router_app
    from router.pd_flow import PDClient

    app = build_router_app(PDClient(["p0"], ["d0"]), tok, api_key=KEY)
    with TestClient(app) as c:
        assert c.get("/pools").status_code == 401
        assert c.get("/pools", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.get("/pools", headers={"Authorization": "Bearer " + KEY})
        assert r.status_code == 200 and [w["name"] for w in r.json()["decode"]] == ["d0"]


def _compares_with_eq(tree: ast.AST) -> list[str]:
    secret = ("api_key", "apikey", "secret", "password", "authorization", "bearer", "_key")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            for side in [node.left, *node.comparators]:
                name = side.attr if isinstance(side, ast.Attribute) else side.id if isinstance(side, ast.Name) else ""
                if any(word in name.lower() for word in secret):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_keys_are_compared_in_constant_time_only():
    """Source check: no ``==``/``!=`` on a key-like name in the API, router and CLI code;
    the middleware's check is ``hmac.compare_digest``."""
    offenders = {str(p.relative_to(REPO)): found for p in _python_files("serving", "router", "deploy")
                 if (found := _compares_with_eq(ast.parse(p.read_text())))}
    assert not offenders, offenders
    source = ast.parse(pathlib.Path(openai_api.__file__).read_text())
    middleware = next(n for n in ast.walk(source) if isinstance(n, ast.ClassDef) and n.name == "APIKeyMiddleware")
    calls = [ast.unparse(n.func) for n in ast.walk(middleware) if isinstance(n, ast.Call)]
    assert "hmac.compare_digest" in calls


# ---- limits -----------------------------------------------------------------------------
def test_limits_are_4xx(tok):
    engine = FakeEngine(tok, max_model_len=64)
    with running_server(engine, tok, max_body_bytes=4096) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        body = {"prompt": "a" * 5000, "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 413  # request size (declared length)
        chunks = (b'{"prompt": "' + b"a" * 1000 for _ in range(5))  # ... and streamed without a length
        assert c.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"}).status_code == 413
        cases = [({"prompt": [65] * 64, "max_tokens": 1}, "prompt"),  # prompt length
                 ({"prompt": "Hi", "max_tokens": 64}, "max_tokens"),
                 ({"prompt": "Hi", "n": MAX_N + 1, "max_tokens": 1}, "n"),
                 ({"prompt": "Hi", "stop": ["x"] * (MAX_STOP_STRINGS + 1), "max_tokens": 1}, "stop"),
                 ({"prompt": "Hi", "logprobs": 21, "max_tokens": 1}, "logprobs")]
        for body, param in cases:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert not engine.running and engine.blocks_in_use == 0
    assert DEFAULT_MAX_BODY_BYTES == 4 * 1024 * 1024 and MAX_N == 64


# ---- chat templates -------------------------------------------------------------------------
ESCAPES = [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append({'role': 'system'}) %}{{ messages }}",  # the immutable sandbox: no mutation
]


@pytest.mark.parametrize("template", ESCAPES)
def test_a_template_escape_fails_cleanly(tmp_path, template):
    model = make_model_dir(str(tmp_path / "model"))
    config_path = os.path.join(model, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    tok = load_tokenizer(model)
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with running_server(FakeEngine(tok), tok) as srv:
        r = httpx.post(srv.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "root:" not in r.text and "subclasses" not in r.text.replace(template, "")


def test_message_text_is_data_not_template_code(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "{{ 7 * 7 }}{% for x in range(3) %}!{% endfor %}"}])
    assert "{{ 7 * 7 }}{% for x in range(3) %}!{% endfor %}" in text and "49" not in text
    # chat_template_kwargs cannot replace the conversation the template renders
    with running_server(FakeEngine(tok), tok) as srv:
        body = {"messages": [{"role": "user", "content": "real"}], "max_tokens": 1,
                "chat_template_kwargs": {"messages": [{"role": "user", "content": "fake"}]}}
        r = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.messages"


# ---- loopback by default -------------------------------------------------------------------
def test_servers_bind_loopback_by_default():
    import argparse

    from serving.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    ns = parser.parse_args(["serve"])
    assert ns.host == "127.0.0.1" and ns.grpc_port is None  # gRPC only when asked, on the same host
    local = yaml.safe_load((REPO / "deploy" / "examples" / "local-cpu.yaml").read_text())
    assert local["router"]["host"] == "127.0.0.1"
    # no server code defaults to every interface; only a deployment file may say so
    wildcard = [f"{p.relative_to(REPO)}:{n.lineno}" for p in _python_files("serving", "router", "deploy", "engine")
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Constant) and n.value in ("0.0.0.0", "::")]
    assert not wildcard, wildcard


# ---- no pickle, no eval --------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _unsafe_node(node: ast.AST) -> str | None:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        return f"import {', '.join(names)}" if names else None
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
        return f"from {node.module} import ..."
    if not isinstance(node, ast.Call):
        return None
    func = ast.unparse(node.func)
    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
    if isinstance(node.func, ast.Name) and func in UNSAFE_BUILTINS:
        return f"{func}(...)"
    if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
        return func
    if func == "torch.load" and keywords.get("weights_only") != "True":
        return "torch.load without weights_only=True"
    if func.endswith("np.load") and keywords.get("allow_pickle") == "True":
        return "np.load(allow_pickle=True)"
    return None


def _unsafe(tree: ast.AST) -> list[str]:
    return [f"line {node.lineno}: {what}" for node in ast.walk(tree) if (what := _unsafe_node(node))]


def test_nothing_on_the_request_path_unpickles_or_evaluates():
    """serving/ (API, gRPC, tokenization), router/, deploy/ (workers) and engine/: no pickle,
    marshal and the like, no eval/exec/compile, only safe YAML and weights-only torch.load."""
    offenders = {str(p.relative_to(REPO)): found for p in _python_files("serving", "router", "deploy", "engine")
                 if (found := _unsafe(ast.parse(p.read_text())))}
    assert not offenders, offenders
    seen = _unsafe(ast.parse("import pickle\nx = eval(s)\ntorch.load(f)\nmodel.eval()"))  # the check itself
    assert seen == ["line 1: import pickle", "line 2: eval(...)", "line 3: torch.load without weights_only=True"]


def _multiprocessing_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[-1] == "multiprocessing"]
        elif isinstance(node, ast.ImportFrom) and "multiprocessing" in (node.module or "").split("."):
            found += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and node.attr in ("Listener", "Client"):
            found.append(ast.unparse(node))
    return found


def test_the_one_pickled_pipe_is_the_one_to_the_servers_own_engine_process():
    """multiprocessing's connections pickle what they carry. On the request path the one such channel is
    ``pdserve serve``'s pipe to the engine process it spawned (``engine.engine_process``): an anonymous
    socketpair only those two processes hold, no listening socket (``Listener`` / ``Client``). Errors
    cross it as plain (kind, text) tuples, not as pickled exception objects."""
    users = {str(p.relative_to(REPO)): found for p in _python_files("serving", "router", "deploy", "engine")
             if (found := _multiprocessing_uses(ast.parse(p.read_text())))}
    assert users == {"engine/engine_process.py": ["multiprocessing"]}, users
    assert _multiprocessing_uses(ast.parse("from multiprocessing.connection import Listener\nmp.connection.Client(a)")) \
        == ["multiprocessing.connection.Listener", "mp.connection.Client"]


def test_the_api_layer_never_touches_ray():
    """Ray object refs stay between the router and the workers: no API-layer module imports Ray
    (``serving/commands/up.py`` starts the cluster; it is a command, not the request path)."""
    importers = []
    for p in _python_files("serving"):
        if p.relative_to(REPO).as_posix() == "serving/commands/up.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importers += [f"{p.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "ray"]
    assert not importers, importers


# ---- no stack traces in answers ---------------------------------------------------------------
class _FailsMidStream(FakeEngine):
    """Streams one delta of every request, then raises as a bug would."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async for out in super().generate(request):
            yield out
            raise KeyError("/srv/secret/path.py internal detail")


def test_500s_carry_no_traceback_or_detail(tok):
    leaks = ("Traceback", "secret", "File \"", "KeyError('")
    engine = _FailsMidStream(tok)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error: KeyError"
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True})
        assert r.status_code == 200  # the failure came after the first token: an error event, then [DONE]
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "internal server error: KeyError"
        for text in (r.text, c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).text):
            assert not any(leak in text for leak in leaks), text
        assert c.post("/v1/completions", json={"max_tokens": 1}).status_code == 400  # still serving, same connection
