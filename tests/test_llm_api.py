"""``LLM.generate`` takes vLLM's prompt forms and ``LLM.chat`` renders like the server (issue #16, item 2).

Forms: str, token-id list, ``{"prompt": str}`` (TextPrompt), ``{"prompt_token_ids": [...]}``
(TokensPrompt), and lists mixing them; every form of the same prompt gives the same greedy
tokens. A wrong shape is a ValueError naming the prompt's position and the shape it got.
``LLM.chat`` submits exactly the token ids ``/v1/chat/completions`` builds for the same messages.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.chat import ChatFormatError
from serving.chat import _prompt_ids
from serving.protocol import ChatCompletionRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
TEXT = "def add(a, b):"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32", num_kv_blocks=64, block_size=16)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_every_vllm_prompt_form_gives_the_same_tokens(llm):
    ids = llm.tokenizer.encode(TEXT)
    (want,) = _tokens(llm.generate(TEXT, GREEDY))
    forms = [TEXT, ids, {"prompt": TEXT}, {"prompt_token_ids": ids}, {"prompt": TEXT, "prompt_token_ids": ids}]
    for form in forms:
        (out,) = llm.generate(form, GREEDY)
        assert out.outputs[0].token_ids == want, form
        assert out.prompt_token_ids == ids
    outs = llm.generate(forms, GREEDY)
    assert _tokens(outs) == [want] * len(forms)
    assert [o.prompt for o in outs] == [TEXT, None, TEXT, None, TEXT]
    assert _tokens(llm.generate([ids, ids], GREEDY)) == [want, want]  # list[list[int]]: a batch


@pytest.mark.parametrize("prompts, message", [
    (["a", "b", {"text": "c"}],
     "prompts[2]: expected str, list[int] or a dict with 'prompt' or 'prompt_token_ids', got dict with keys ['text']"),
    ({"prompt": "x", "multi_modal_data": {}},
     "prompts[0]: expected str, list[int] or a dict with 'prompt' or 'prompt_token_ids', "
     "got dict with keys ['multi_modal_data', 'prompt']"),
    ([[1, 2], [3, "4"]], "prompts[1]: expected str, list[int] or a dict with 'prompt' or 'prompt_token_ids', "
                         "got list[int | str]"),
    ([1.5], "prompts[0]: expected str, list[int] or a dict with 'prompt' or 'prompt_token_ids', got float"),
    ({"prompt": 7}, "prompts[0]['prompt']: expected str, got int"),
    ({"prompt_token_ids": [1, "2"]}, "prompts[0]['prompt_token_ids'][1]: expected an int token id, got str"),
    ({"prompt_token_ids": []}, "prompts[0]['prompt_token_ids']: expected a non-empty list[int], got empty list"),
    ([{"prompt_token_ids": [5, 10**6]}], "prompts[0]['prompt_token_ids'][1]: token id 1000000 is outside the vocabulary"),
    ([], "prompts: expected at least one prompt, got an empty list"),
    (42, "prompts: expected str, list[int] or a dict with 'prompt' or 'prompt_token_ids' or a list of them, got int"),
])
def test_wrong_prompt_shapes_name_the_shape(llm, prompts, message):
    with pytest.raises(ValueError) as info:
        llm.generate(prompts, GREEDY)
    assert str(info.value).startswith(message), str(info.value)
    assert not llm.engine.has_unfinished()  # nothing was queued


MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]


def test_chat_submits_the_servers_prompt_and_generates(llm):
    server_ids = _prompt_ids(ChatCompletionRequest.model_validate({"messages": MESSAGES}), llm.tokenizer)
    (out,) = llm.chat(MESSAGES, GREEDY)
    assert out.prompt_token_ids == server_ids
    assert out.prompt == llm.tokenizer.decode(server_ids)
    assert out.outputs[0].token_ids == _tokens(llm.generate({"prompt_token_ids": server_ids}, GREEDY))[0]
    developer = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]  # rendered as system
    second = [{"role": "user", "content": "Bye"}]
    outs = llm.chat([developer, second], GREEDY)  # a batch of conversations
    assert outs[0].prompt_token_ids == server_ids
    assert outs[1].prompt_token_ids == _prompt_ids(ChatCompletionRequest.model_validate({"messages": second}),
                                                   llm.tokenizer)


def test_chat_errors_name_the_field(llm):
    with pytest.raises(ChatFormatError) as info:
        llm.chat([{"role": "robot", "content": "hi"}])
    assert info.value.param == "messages[0].role" and "robot" in str(info.value)
    with pytest.raises(ChatFormatError) as info:
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert info.value.param == "messages[0].content[0].type" and "image_url" in str(info.value)
