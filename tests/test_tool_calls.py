"""Tool calls (issue #16, item 4): DeepSeek-V3's tool-call format in and out of the chat API.

* the parser, on every way of splitting a reply into deltas;
* the openai SDK's tool-calling example, unchanged, against a server whose (fake) model
  replies with scripted text in DeepSeek-V3's format: tool_calls out, the assistant call and
  the ``role: tool`` result rendered back into the next prompt; streaming deltas in OpenAI's shape;
* tool_choice none / auto / required / named (the forced prefix at the end of the prompt),
  parallel_tool_calls=false, and the errors;
* the real engine on a random checkpoint whose tokenizer has the markers as special tokens:
  the forced prefix is encoded as those tokens, the markers reach the parser, and the
  end-of-sentence text is not shown.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from engine.async_engine import AsyncEngine
from engine.args import EngineArgs
from engine.checkpoint.random_ckpt import make_random_checkpoint
from engine.tokenizer import load_tokenizer
from fake_engine import FakeEngine, make_model_dir, running_server
from serving.chat import _engine_request, _tool_mode
from serving.protocol import ChatCompletionRequest
from serving.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, Parsed, ToolCallParser
from tool_model import add_tool_tokens, use_tool_template

MODEL = "tool-model"
WEATHER_TOOL = {  # the openai SDK's function-calling example
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {"type": "object",
                       "properties": {"location": {"type": "string", "description": "The city and state"},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["location"]},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call_text(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


BOSTON = '{"location": "Boston, MA"}'
TWO_CALLS = "Let me look." + CALLS_BEGIN + call_text("get_current_weather", BOSTON) + "\n" + call_text("get_time", "{}") + CALLS_END


# ---- the parser ------------------------------------------------------------------------------
def _parse_in_pieces(text: str, cuts: list[int], max_calls: int | None = None) -> tuple[ToolCallParser, Parsed]:
    parser, out = ToolCallParser(max_calls), Parsed()
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        out.extend(parser.feed(text[a:b]))
    out.extend(parser.finish())
    return parser, out


def _arguments(out: Parsed) -> dict[int, str]:
    args: dict[int, str] = {}
    for d in out.tool_calls:
        args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    return args


def test_parser_gives_the_same_result_however_the_text_is_split():
    text = TWO_CALLS + "<｜end▁of▁sentence｜>"
    for step in (1, 2, 3, 5, 8, 13, len(text)):
        for offset in range(step):
            parser, out = _parse_in_pieces(text, list(range(offset or step, len(text), step)))
            assert out.content == parser.content == "Let me look."
            assert [(c.name, c.arguments) for c in parser.calls] == [
                ("get_current_weather", '{"location": "Boston, MA"}'), ("get_time", "{}")]
            assert _arguments(out) == {0: '{"location": "Boston, MA"}', 1: "{}"}
            firsts = [d for d in out.tool_calls if "id" in d]
            assert [d["function"]["name"] for d in firsts] == ["get_current_weather", "get_time"]
            assert all(d["function"]["arguments"] == "" and d["type"] == "function" for d in firsts)


@pytest.mark.parametrize("text, content, calls", [
    ("no tools here", "no tools here", []),
    ("ends like a marker <｜tool▁calls", "ends like a marker <｜tool▁calls", []),  # released at the end
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n{{\"a\": 1}}{CALL_END}{CALLS_END}", "", [("f", '{"a": 1}')]),
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{\"a\": \"`x`\"}}```  \n{CALL_END}", "",
     [("f", '{"a": "`x`"}')]),
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{\"a\": [1, 2", "", [("f", '{"a": [1, 2')]),  # cut short
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}trunc", "", []),  # the name never ended: no call
    (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f{CALL_END}{CALLS_END}trailing", "", [("f", "")]),
])
def test_parser_edge_cases(text, content, calls):
    for cuts in ([], list(range(1, len(text)))):
        parser, out = _parse_in_pieces(text, cuts)
        assert out.content == content
        assert [(c.name, c.arguments) for c in parser.calls] == calls


def test_parser_keeps_only_max_calls():
    parser, out = _parse_in_pieces(TWO_CALLS, [7, 40, 90], max_calls=1)
    assert [c.name for c in parser.calls] == ["get_current_weather"] and set(_arguments(out)) == {0}


# ---- the API with a scripted model -----------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(use_tool_template(make_model_dir(str(tmp_path_factory.mktemp("tool-model")))))


class Script:
    """Replies in turn; records each prompt as text."""

    def __init__(self, tok, *replies: str):
        self.tok, self.replies, self.prompts = tok, list(replies), []

    def __call__(self, request, k: int) -> str:
        self.prompts.append(self.tok.decode(request.prompt_token_ids))
        return self.replies[min(len(self.prompts) - 1, len(self.replies) - 1)]


def _serve(tok, script: Script):
    return running_server(FakeEngine(tok, model_name=MODEL, max_model_len=4096, reply=script), tok)


def test_openai_sdk_tool_calling_example_runs_unchanged(tok):
    reply = CALLS_BEGIN + call_text("get_current_weather", '{"location": "Boston, MA", "unit": "celsius"}') + CALLS_END
    script = Script(tok, reply, "It is 22 degrees in Boston.")
    with _serve(tok, script) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="unused")
        messages = [{"role": "user", "content": "What's the weather like in Boston today?"}]
        response = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                  tool_choice="auto")
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        tool_call = choice.message.tool_calls[0]
        assert tool_call.type == "function" and tool_call.id.startswith("call_")
        assert tool_call.function.name == "get_current_weather"
        assert json.loads(tool_call.function.arguments) == {"location": "Boston, MA", "unit": "celsius"}
        messages.append(choice.message)
        messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps({"temperature": 22})})
        second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
        assert second.choices[0].message.content == "It is 22 degrees in Boston."
        assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    first_prompt, second_prompt = script.prompts
    assert '"name": "get_current_weather"' in first_prompt  # the template listed the tool
    assert second_prompt.startswith(first_prompt)
    assert second_prompt.endswith(  # the call rendered back, then the tool's result
        f"{reply}<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
        '{"temperature": 22}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>')


def test_streamed_tool_calls_have_openais_delta_shape(tok):
    with _serve(tok, Script(tok, TWO_CALLS)) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="unused")
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                                tools=[WEATHER_TOOL, TIME_TOOL], stream=True)
        chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me look."
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index not in calls:  # the first delta of a call: id, type and name, no arguments yet
            assert d.id.startswith("call_") and d.type == "function" and d.function.arguments == ""
            calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
        else:  # then argument fragments only
            assert d.id is None and d.function.name is None
            calls[d.index]["arguments"] += d.function.arguments
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("get_current_weather", '{"location": "Boston, MA"}'), ("get_time", "{}")]
    assert len(deltas) > 3  # arguments arrived in several fragments


def _chat(url: str, **body) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], **body}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_tool_choice_required_and_named_force_the_call(tok):
    after_name = f"\n```json\n{{}}\n```{CALL_END}{CALLS_END}"
    script = Script(tok, "get_time" + after_name, '{"location": "Paris"}\n```' + CALL_END + CALLS_END)
    with _serve(tok, script) as srv:
        out = _chat(srv.url, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
        assert script.prompts[0].endswith(f"<｜Assistant｜>{CALLS_BEGIN}{CALL_BEGIN}function{SEP}")
        assert out["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        named = {"type": "function", "function": {"name": "get_current_weather"}}
        out = _chat(srv.url, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=named)
        assert script.prompts[1].endswith(f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_current_weather\n```json\n")
        (call,) = out["choices"][0]["message"]["tool_calls"]
        assert call["function"] == {"name": "get_current_weather", "arguments": '{"location": "Paris"}'}
        # streamed: the forced name comes first
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Paris?"}], "stream": True,
                "tools": [WEATHER_TOOL], "tool_choice": named}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        first = next(e["choices"][0]["delta"]["tool_calls"][0] for e in events if e["choices"][0]["delta"].get("tool_calls"))
        assert first["function"]["name"] == "get_current_weather" and first["id"].startswith("call_")


def test_tool_choice_none_and_parallel_tool_calls_false(tok):
    with _serve(tok, Script(tok, TWO_CALLS)) as srv:
        out = _chat(srv.url, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="none")
        assert out["choices"][0]["message"] == {"role": "assistant", "content": TWO_CALLS}  # not parsed
        assert out["choices"][0]["finish_reason"] == "stop"
        out = _chat(srv.url, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False)
        assert [c["function"]["name"] for c in out["choices"][0]["message"]["tool_calls"]] == ["get_current_weather"]
        assert out["choices"][0]["message"]["content"] == "Let me look."


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name\n"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "tool_choice"),
])
def test_tool_errors_name_the_field(tok, body, param):
    with _serve(tok, Script(tok, "x")) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# ---- the real engine, markers as special tokens ----------------------------------------------
@pytest.fixture(scope="module")
def tool_checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-tools")
    make_random_checkpoint(path, "tiny", seed=0)
    return add_tool_tokens(path)


def test_real_engine_with_special_tool_tokens(tool_checkpoint):
    tok = load_tokenizer(tool_checkpoint)
    engine = AsyncEngine(EngineArgs(model=tool_checkpoint, served_model_name=MODEL, dtype="float32",
                                    num_kv_blocks=64, block_size=16))
    named = {"type": "function", "function": {"name": "get_time"}}
    messages = [{"role": "user", "content": "What time is it?"}]
    with running_server(engine, tok) as srv:
        out = _chat(srv.url, messages=messages, tools=[TIME_TOOL], tool_choice=named, max_tokens=6, temperature=0)
        (call,) = out["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_time" and out["choices"][0]["finish_reason"] == "length"
        plain = _chat(srv.url, messages=messages, tools=[TIME_TOOL], max_tokens=6, temperature=0)
        # the forced prefix is six tokens (four special markers, "function", the name + fence): one prompt, encoded once
        prefix = tok.encode(f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_time\n```json\n", add_special_tokens=False)
        assert tok.hf.token_to_id(CALLS_BEGIN) == prefix[0] and tok.hf.token_to_id(SEP) in prefix
        assert out["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + len(prefix)
        # an end-of-sentence token ends the reply: its text is not content, though special tokens are kept
        eos = str(tok.eos_token_id)
        stop = _chat(srv.url, messages=messages, tools=[TIME_TOOL], max_tokens=6, logit_bias={eos: 100})
        assert stop["choices"][0]["message"] == {"role": "assistant", "content": ""}
        assert stop["choices"][0]["finish_reason"] == "stop" and stop["usage"]["completion_tokens"] == 1


def test_markers_as_special_tokens_are_kept_for_the_parser(tool_checkpoint, tok):
    special_tok = load_tokenizer(tool_checkpoint)

    def params(tokenizer, **body):
        req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})
        mode = _tool_mode(req, tokenizer)
        return _engine_request(req, [1, 2, 3], 100, "r", mode).sampling_params

    assert params(special_tok, tools=[TIME_TOOL]).skip_special_tokens is False
    assert params(special_tok, tools=[TIME_TOOL], tool_choice="none").skip_special_tokens is True
    assert params(special_tok).skip_special_tokens is True
    assert params(tok, tools=[TIME_TOOL]).skip_special_tokens is True  # markers are plain text there


def test_assistant_tool_call_turn_renders_the_same_with_null_or_empty_content(tok):
    from engine.chat import render_chat

    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    turns = [[{"role": "user", "content": "time?"}, {"role": "assistant", "content": content, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}] for content in (None, "")]
    prompts = [tok.decode(render_chat(tok, t, tools=[TIME_TOOL])) for t in turns]
    assert prompts[0] == prompts[1] and CALL_BEGIN + "function" + SEP + "get_time" in prompts[0]
