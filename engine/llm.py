"""Offline batch generation, shaped like vLLM's ``LLM`` so users can switch.

    from engine import LLM, SamplingParams
    llm = LLM(model="models/pdserve-mini")
    outs = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
    outs = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=32))

Prompts take vLLM's forms: a string, a token-id list, ``{"prompt": str}`` (TextPrompt),
``{"prompt_token_ids": list[int]}`` (TokensPrompt), or a list of any of these. ``chat``
renders conversations with the model's chat template exactly as ``/v1/chat/completions``
does (``engine.chat``).
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from engine.args import EngineArgs
from engine.chat import render_chat
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

# str | list[int] | {"prompt": str} | {"prompt_token_ids": list[int]}
Prompt = str | list[int] | Mapping[str, Any]
_PROMPT_FORMS = "str, list[int] or a dict with 'prompt' or 'prompt_token_ids'"


class LLM:
    def __init__(self, model: str | None = None, **options):
        self.engine = LLMEngine(EngineArgs.from_kwargs(model, **options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order, each completion whole (``use_tqdm``: a progress bar)."""
        batch = _as_batch(prompts)
        return self._run([self._encode(p, f"prompts[{i}]") for i, p in enumerate(batch)], sampling_params, use_tqdm)

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
             add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a batch of them (a list of such lists),
        rendered by the model's chat template the way the server renders them."""
        if self.engine.tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer with a chat template; this model directory has none")
        batch = [messages] if not messages or isinstance(messages[0], Mapping) else list(messages)
        encoded = []
        for i, conversation in enumerate(batch):
            ids = render_chat(self.engine.tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                              tools=tools, template_kwargs=chat_template_kwargs)
            encoded.append((ids, self.engine.tokenizer.decode(ids)))
        return self._run(encoded, sampling_params, use_tqdm)

    def _run(self, prompts: list[tuple[list[int], str | None]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        results: dict[str, RequestOutput] = {}
        order = []
        for (ids, text), p in zip(prompts, params):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            order.append(rid)
            results[rid] = RequestOutput(rid, ids, [], prompt=text)
        bar = tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                results[delta.request_id].merge(delta)
                bar.update(int(delta.finished))
        bar.close()
        return [results[rid] for rid in order]

    def _encode(self, prompt: Prompt, where: str) -> tuple[list[int], str | None]:
        """Token ids and text of one prompt in any of vLLM's forms; ValueError naming ``where`` and the shape."""
        if isinstance(prompt, Mapping):
            unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
            if unknown or not prompt:
                raise ValueError(f"{where}: expected {_PROMPT_FORMS}, got {_shape(prompt)}")
            if "prompt_token_ids" in prompt:  # vLLM: token ids win over the text they came from
                return self._token_ids(prompt["prompt_token_ids"], f"{where}['prompt_token_ids']"), prompt.get("prompt")
            prompt, where = prompt["prompt"], f"{where}['prompt']"
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: expected str, got {_shape(prompt)}")
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError(f"{where}: text prompts need a tokenizer; this model directory has none "
                                 f"(pass token ids)")
            return self.engine.tokenizer.encode(prompt), prompt
        if isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
            return self._token_ids(prompt, where), None
        raise ValueError(f"{where}: expected {_PROMPT_FORMS}, got {_shape(prompt)}")

    def _token_ids(self, ids: Any, where: str) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"{where}: expected a non-empty list[int], got {_shape(ids)}")
        vocab = self.engine.config.vocab_size
        for j, t in enumerate(ids):
            if not _is_int(t):
                raise ValueError(f"{where}[{j}]: expected an int token id, got {_shape(t)}")
            if not 0 <= t < vocab:
                raise ValueError(f"{where}[{j}]: token id {t} is outside the vocabulary [0, {vocab})")
        return list(ids)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(x: Any) -> str:
    """How a wrong prompt looks, for error messages: ``dict with keys ['text']``, ``list[str]``, ``float``."""
    if isinstance(x, Mapping):
        return f"dict with keys {sorted(map(str, x))}"
    if isinstance(x, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in x})
        return f"{type(x).__name__}[{' | '.join(kinds)}]" if kinds else f"empty {type(x).__name__}"
    return type(x).__name__


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (str, dict, token-id list) becomes a batch of one; a list of prompts stays as it is."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        return [list(prompts)] if _is_int(prompts[0]) else list(prompts)
    raise ValueError(f"prompts: expected {_PROMPT_FORMS} or a list of them, got {_shape(prompts)}")
