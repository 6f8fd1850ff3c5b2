"""pdserve's engine: the model, the scheduler, the paged latent cache, sampling.

``LLM`` and ``AsyncEngine`` import torch; they load on first use so that
torch-free users of this package (the API layer) never pay for it.
"""

from engine.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from engine.outputs import CompletionOutput, RequestOutput

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
