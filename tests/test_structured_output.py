"""Structured output: every output follows its constraint (JSON schema, JSON object, regex, choice,
grammar) on the bundled model and a random one, with n > 1 and MTP drafts; a sequence resumed on
another engine (a Continuation, a KV hand-off) keeps its grammar; invalid constraints are 400s.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import jsonschema
import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.args import EngineArgs
from engine.async_engine import AsyncEngine
from engine.engine import LLMEngine
from engine.sampler import SamplingRow
from engine.sampling_params import Continuation, SamplingParamError
from engine.spec_decode import VerifyGroup, verify
from engine.structured_output import GrammarBook, compile_grammar
from engine.tokenizer import load_tokenizer
from fake_engine import FakeEngine, make_model_dir, running_server
from handoff import prefill_then_decode
from serving.tool_calls import call_grammar

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pdserve-mini")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe"]
GBNF = 'root ::= "x" [0-9]{1,3} "y"'
SMALL = {"dtype": "float32", "num_kv_blocks": 64, "block_size": 16}


def _closing_bias(tok) -> dict[int, float]:
    """JSON object: a random model ends its strings and objects within max_tokens when their closing
    tokens are likelier (the grammar still decides what is allowed)."""
    return {i: 6.0 for i in range(tok.vocab_size) if (t := tok.token_text(i).strip()) and set(t) <= set('"}],')}


def _requests(tok, kinds: str) -> list[tuple[SamplingParams, callable]]:
    def params(n: int = 1, **so) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=7, n=n, max_tokens=100, structured_outputs=StructuredOutputsParams(**so))

    every = {
        "json": (params(json=SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
        "compact": (params(n=2, json=SCHEMA, disable_any_whitespace=True),
                    lambda text: jsonschema.validate(json.loads(text), SCHEMA) or "\n" not in text or pytest.fail(text)),
        "regex": (params(regex=REGEX), lambda text: re.fullmatch(REGEX, text) or pytest.fail(f"{text!r} !~ {REGEX}")),
        "choice": (params(n=2, choice=CHOICES), lambda text: text in CHOICES or pytest.fail(f"{text!r} not a choice")),
        "grammar": (params(grammar=GBNF), lambda text: re.fullmatch(r"x[0-9]{1,3}y", text) or pytest.fail(text)),
        "object": (params(json_object=True).clone(logit_bias=_closing_bias(tok)),
                   lambda text: isinstance(json.loads(text), dict) or pytest.fail(text)),
    }
    return [every[k] for k in kinds.split()]


def _check_all(llm: LLM, kinds: str, prompt: str = "def f(x):\n") -> None:
    requests = _requests(llm.tokenizer, kinds)
    outs = llm.generate([prompt] * len(requests), [p for p, _ in requests])
    for (params, check), out in zip(requests, outs):
        assert len(out.outputs) == params.n
        for c in out.outputs:
            assert c.finish_reason == "stop", (params.structured_outputs.kind, c.text)
            check(c.text)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return LLM(tiny_checkpoint, **SMALL)


def test_random_model_outputs_follow_their_constraints(tiny):
    _check_all(tiny, "json compact regex choice grammar object")
    assert tiny.engine.kv.num_used_blocks == 0


def test_bundled_model_with_mtp_follows_constraints_and_accepts_drafts():
    """MTP drafts are cut at the first token the grammar rejects; the rest are verified under each verify
    row's mask. (A random model's drafts are nearly all cut, so the trained one shows acceptance, on a
    constraint its own text fits: under a JSON schema its Python-like drafts are mostly cut too.)"""
    llm = LLM(BUNDLED, speculative="mtp", num_speculative_tokens=2, **SMALL)
    _check_all(llm, "compact choice", "# settings as JSON\n")  # drafts here are Python and mostly cut
    # a constraint the model's own text fits: its drafts pass the grammar and are accepted
    # at most 4 x 28 characters, so the grammar ends (only end-of-sequence left) within max_tokens, however the
    # sampled row draws
    lines = r"(import [a-z_]{1,20}\n){4}"
    so = StructuredOutputsParams(regex=lines)
    outs = llm.generate(["import os\n"] * 2, [SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=so),
                                              SamplingParams(temperature=1.0, seed=7, max_tokens=120, structured_outputs=so)])
    for out in outs:
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(lines, out.outputs[0].text), out.outputs[0].text
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens > 0


def test_drafts_the_grammar_rejects_are_rejected_and_the_matcher_rolls_back(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    book = GrammarBook(tiny_checkpoint, 512)
    seq = book.sequence(compile_grammar(StructuredOutputsParams(choice=["yes", "no"])), [], [tok.eos_token_id])
    before = seq.allowed()
    yes = tok.encode("yes", add_special_tokens=False)
    bad = next(t for t in range(512) if not before[t])
    masks = seq.masks_along([yes[0], bad])
    assert (seq.allowed() == before).all() and (masks[0] == before).all()  # rolled back
    assert masks[1][yes[1] if len(yes) > 1 else tok.eos_token_id] and not masks[1][bad]
    # greedy verification: the model's favourite is the draft, the grammar forbids it -> rejected
    logits = torch.zeros(2, 512)
    logits[:, bad] = 10.0
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1], [], allowed=before),
            SamplingRow(SamplingParams(temperature=0.0), [1], [bad], allowed=before)]
    (tokens,) = verify(logits, rows, [VerifyGroup(0, [bad], None)], None)
    assert tokens[0] != bad and before[tokens[0]]


def _text(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def test_resumed_sequence_replays_its_grammar_state(tiny_checkpoint, tiny):
    """A Continuation (the router's resume) and a KV hand-off: the decode side rebuilds the matcher
    from the grammar and the tokens generated before, and the whole output still validates."""
    tok = load_tokenizer(tiny_checkpoint)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=100,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    prompt = tok.encode("def f(x):\n")
    first = tiny.generate({"prompt_token_ids": prompt}, params.clone(max_tokens=6))
    head = first[0].outputs[0].token_ids
    assert len(head) == 6
    other = tiny.engine  # (any engine: nothing of the first run is left there)
    other.add_request("r", prompt, params, continuation=Continuation(output_token_ids=tuple(head)))
    tail = []
    while other.has_unfinished():
        for out in other.step():
            tail += out.outputs[0].token_ids
    jsonschema.validate(json.loads(_text(tok, head + tail)), SCHEMA)

    prefill = LLMEngine(EngineArgs(model=tiny_checkpoint, role="prefill", **SMALL))
    decode = LLMEngine(EngineArgs(model=tiny_checkpoint, role="decode", **SMALL))
    payloads = []
    got = prefill_then_decode(prefill, decode, {"h": (prompt, params.clone(seed=4))}, payloads=payloads)
    (payload,) = payloads
    assert payload.control.params.structured_outputs == params.structured_outputs  # the constraint travels
    # the prefill engine's token, replayed into the decode side's matcher (which reports it too)
    assert got["h"][:1] == list(payload.control.output_token_ids)
    jsonschema.validate(json.loads(_text(tok, got["h"])), SCHEMA)


def test_invalid_constraints_are_sampling_errors(tiny):
    with pytest.raises(SamplingParamError, match="structured_outputs: give exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(SamplingParamError, match="invalid regex"):
        compile_grammar(StructuredOutputsParams(regex="(ab"))
    with pytest.raises(SamplingParamError, match="invalid json"):
        tiny.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "foo"})))


# ---- HTTP ---------------------------------------------------------------------------------------
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: nope"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"json": {"$ref": "#/missing"}}}, "structured_outputs"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_invalid_constraints_are_400s(tmp_path_factory, path):
    tok = load_tokenizer(make_model_dir(str(tmp_path_factory.mktemp("model"))))
    base = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    with running_server(FakeEngine(tok), tok) as srv:
        for body, param in BAD:
            r = httpx.post(srv.url + path, json={**base, **body, "max_tokens": 4})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"].startswith(param) and err["type"] == "invalid_request_error", (body, err)


def test_http_response_format_guided_fields_and_forced_tool(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    engine = AsyncEngine(EngineArgs(model=tiny_checkpoint, served_model_name="m", **SMALL))
    messages = [{"role": "user", "content": "Who?"}]
    with running_server(engine, tok) as srv:
        def post(path: str, **body) -> dict:
            r = httpx.post(srv.url + path, json={"max_tokens": 150, "seed": 1, **body}, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
        chat = post("/v1/chat/completions", messages=messages, response_format=fmt)
        for c in chat["choices"]:
            jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)
        comp = post("/v1/completions", prompt="x", guided_choice=CHOICES, n=2)
        assert all(c["text"] in CHOICES for c in comp["choices"])
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=300,
                          json={"prompt": "x", "guided_choice": CHOICES, "max_tokens": 20, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events) in CHOICES
        comp = post("/v1/completions", prompt="x", structured_outputs={"regex": REGEX})  # vLLM's newer object
        assert re.fullmatch(REGEX, comp["choices"][0]["text"])
        args = {"type": "object", "properties": {"q": {"enum": ["a", "b"]}}, "required": ["q"], "additionalProperties": False}
        tool = {"type": "function", "function": {"name": "lookup", "parameters": args}}
        named = post("/v1/chat/completions", messages=messages, tools=[tool], max_tokens=300,
                     tool_choice={"type": "function", "function": {"name": "lookup"}})
        (call,) = named["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "lookup" and named["choices"][0]["finish_reason"] == "tool_calls"
        jsonschema.validate(json.loads(call["function"]["arguments"]), args)


def test_grpc_request_maps_guided_fields():
    from serving.grpc_server import completion_request
    from serving.proto import pdserve_pb2 as pb

    req = completion_request(pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(
        guided_choice=["a", "b"])))
    assert req.guided_choice == ["a", "b"]
    req = completion_request(pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(guided_json_object=True)))
    assert req.response_format.type == "json_object"


def test_required_tool_choice_grammar_takes_any_tool_and_parallel_calls(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    args = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    grammar = compile_grammar(StructuredOutputsParams(grammar=call_grammar({"weather": args, "noop": None}, None, True)))
    two = ('weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
           'noop\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    book = GrammarBook(tiny_checkpoint, 512)
    for text, ok in [(two, True), (two.replace('"city"', '"town"'), False), (two.replace("noop", "nope"), False)]:
        seq = book.sequence(grammar, [], [tok.eos_token_id])
        ids = tok.encode(text, add_special_tokens=False)
        assert (seq.matcher.try_consume_tokens(ids) == len(ids) and seq.matcher.is_accepting()) == ok, text


def test_bitmask_unpacking_matches_llguidance_order(tiny_checkpoint):
    book = GrammarBook(tiny_checkpoint, 520)  # a model vocabulary wider than the tokenizer's
    tok = load_tokenizer(tiny_checkpoint)
    seq = book.sequence(compile_grammar(StructuredOutputsParams(regex="a")), [], [tok.eos_token_id])
    allowed = seq.allowed()
    assert allowed.shape == (520,) and not allowed[512:].any()
    assert np.flatnonzero(allowed).tolist() == [tok.hf.token_to_id("a")]
