"""Offline batch generation, shaped like vLLM's ``LLM`` so users can switch.

    from engine import LLM, SamplingParams
    llm = LLM(model="models/pdserve-mini")
    outs = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from typing import Sequence

from tqdm import tqdm

from engine.args import EngineArgs
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


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
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params):
            rid = f"llm-{next(self._ids)}"
            ids = self._encode(prompt)
            self.engine.add_request(rid, ids, p)
            order.append(rid)
            results[rid] = RequestOutput(rid, ids, [], prompt=prompt if isinstance(prompt, str) else None)
        bar = tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                results[delta.request_id].merge(delta)
                bar.update(int(delta.finished))
        bar.close()
        return [results[rid] for rid in order]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; this model directory has none (pass token ids)")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)
