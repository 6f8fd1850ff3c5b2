"""A small client for pdserve's gRPC API (``pdserve.v1.PDServe``), blocking and asyncio.

    with GrpcClient("127.0.0.1:50051") as c:
        for msg in c.generate("Hello", max_tokens=8, temperature=0):
            print(msg.text, end="")

    async with AsyncGrpcClient("127.0.0.1:50051") as c:
        async for msg in c.generate([1, 2, 3], max_tokens=8, seed=7):
            ...

``generate`` takes a text prompt or a token-id list plus the HTTP API's sampling
parameter names as keywords (``stop`` may be a string), and returns the call: iterate
it for ``GenerateResponse`` messages (usage on the last), ``cancel()`` it to abort the
request. Failures raise ``grpc.RpcError`` (``grpc.aio.AioRpcError``) with the server's
status code and message.
"""

from __future__ import annotations

from typing import Any

import grpc

from serving.proto import pdserve_pb2 as pb
from serving.proto import pdserve_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def generate_request(prompt: str | list[int], *, model: str = "", request_id: str = "",
                     add_special_tokens: bool | None = None, priority: int = 0,
                     **sampling: Any) -> pb.GenerateRequest:
    """A ``GenerateRequest``; ``sampling`` holds ``SamplingParams`` fields by their HTTP names."""
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    request = pb.GenerateRequest(model=model, request_id=request_id, priority=priority,
                                 sampling_params=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def _tokenize_request(text: str, add_special_tokens: bool | None, model: str) -> pb.TokenizeRequest:
    request = pb.TokenizeRequest(model=model, text=text)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


class GrpcClient:
    """Blocking client over one insecure channel to ``target`` ("host:port")."""

    def __init__(self, target: str, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.channel = grpc.insecure_channel(target, options=_options(max_message_bytes))
        self.stub = pb_grpc.PDServeStub(self.channel)
        self.timeout = timeout

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Any:
        """The streaming call: an iterator of ``GenerateResponse`` with ``cancel()``."""
        return self.stub.Generate(generate_request(prompt, **kwargs), timeout=self.timeout)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout).aborted

    def tokenize(self, text: str, *, add_special_tokens: bool | None = None, model: str = "") -> list[int]:
        return list(self.stub.Tokenize(_tokenize_request(text, add_special_tokens, model), timeout=self.timeout)
                    .token_ids)

    def detokenize(self, token_ids: list[int], *, skip_special_tokens: bool = False, model: str = "") -> str:
        request = pb.DetokenizeRequest(model=model, token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(request, timeout=self.timeout).text

    def list_models(self) -> list[pb.ModelCard]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncGrpcClient:
    """asyncio client over one ``grpc.aio`` channel; create it inside the event loop that uses it."""

    def __init__(self, target: str, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.channel = grpc.aio.insecure_channel(target, options=_options(max_message_bytes))
        self.stub = pb_grpc.PDServeStub(self.channel)
        self.timeout = timeout

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Any:
        """The streaming call: an async iterator of ``GenerateResponse`` with ``cancel()``."""
        return self.stub.Generate(generate_request(prompt, **kwargs), timeout=self.timeout)

    async def abort(self, request_id: str) -> bool:
        return (await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout)).aborted

    async def tokenize(self, text: str, *, add_special_tokens: bool | None = None, model: str = "") -> list[int]:
        response = await self.stub.Tokenize(_tokenize_request(text, add_special_tokens, model), timeout=self.timeout)
        return list(response.token_ids)

    async def detokenize(self, token_ids: list[int], *, skip_special_tokens: bool = False, model: str = "") -> str:
        request = pb.DetokenizeRequest(model=model, token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self.stub.Detokenize(request, timeout=self.timeout)).text

    async def list_models(self) -> list[pb.ModelCard]:
        return list((await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)).models)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncGrpcClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
