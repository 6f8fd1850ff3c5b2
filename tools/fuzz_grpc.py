"""Fuzz a running pdserve gRPC API (``pdserve.v1.PDServe``): wrong values never come back UNKNOWN or INTERNAL.

    .venv/bin/python tools/fuzz_grpc.py --target 127.0.0.1:50051 [--examples 200] [--seed 0]

Hypothesis strategies over every field of the ``Generate``, ``Tokenize`` and ``Detokenize``
requests (int64 fields over their whole range, doubles with NaN and infinities, any
Unicode text, token ids over uint32, unknown models, odd request ids), plus raw bytes
sent as the request of every method, ``Abort`` and ``ListModels`` too (corrupt wire format,
bad UTF-8 in string fields). Every call must end OK or with one of ``ALLOWED``
(INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED); an OK ``Generate``
stream must end with a ``finish_reason``. After the run the server must still generate. Prints a report and exits 1 on a failure;
``run`` is what ``tests/test_fuzz_grpc.py`` calls against servers it starts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from typing import Any, Callable

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from serving.proto import pdserve_pb2 as pb

SERVICE = "/pdserve.v1.PDServe/"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)
SMALL_INT = st.integers(-2, 70)  # where the valid ranges of n, top_k, max_tokens, logprobs are


def _optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


def _model(model: str) -> st.SearchStrategy:
    """Mostly the served model (or unset), so most calls get past the model check; sometimes any text."""
    return st.integers(0, 9).flatmap(lambda i: st.text(max_size=20) if i == 0 else st.sampled_from(["", model]))


def _token_ids(vocab_hint: int) -> st.SearchStrategy:
    return st.lists(st.integers(0, vocab_hint) | UINT32, max_size=40)


@st.composite
def sampling_params(draw: Callable) -> pb.SamplingParams:
    fields: dict[str, Any] = {}
    for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "seed"):
        fields[name] = draw(_optional(SMALL_INT | INT64))
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        fields[name] = draw(_optional(st.floats(-3, 3) | DOUBLE))
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        fields[name] = draw(_optional(st.booleans()))
    fields["stop"] = draw(st.lists(st.text(max_size=300), max_size=20))
    fields["stop_token_ids"] = draw(st.lists(INT64 | st.integers(0, 500), max_size=10))
    return pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})


def generate_requests(model: str, vocab_hint: int = 300) -> st.SearchStrategy:
    @st.composite
    def build(draw: Callable) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            model=draw(_model(model)),
            request_id=draw(st.just("") | st.text(max_size=140)),
            sampling_params=draw(sampling_params()),
            priority=draw(st.just(0) | INT64))
        prompt = draw(st.sampled_from(["none", "text", "token_ids"]))
        if prompt == "text":
            request.text = draw(st.text(max_size=200))
        elif prompt == "token_ids":
            request.token_ids.ids.extend(draw(_token_ids(vocab_hint)))
        add = draw(_optional(st.booleans()))
        if add is not None:
            request.add_special_tokens = add
        return request
    return build()


def tokenize_requests(model: str) -> st.SearchStrategy:
    return st.builds(lambda m, text, add: pb.TokenizeRequest(model=m, text=text, **({} if add is None else
                                                                                   {"add_special_tokens": add})),
                     _model(model), st.text(max_size=500),
                     _optional(st.booleans()))


def detokenize_requests(model: str, vocab_hint: int = 300) -> st.SearchStrategy:
    return st.builds(lambda m, ids, skip: pb.DetokenizeRequest(model=m, token_ids=ids, skip_special_tokens=skip),
                     _model(model), _token_ids(vocab_hint), st.booleans())


@dataclasses.dataclass
class Report:
    calls: int = 0
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(self.codes.items()))
        return f"{self.calls} calls ({codes}); failures: {len(self.failures)}"


class _Caller:
    """Calls one method with a message or raw bytes; records the outcome in ``report``."""

    def __init__(self, channel: grpc.Channel, report: Report, timeout: float):
        self.channel, self.report, self.timeout = channel, report, timeout

    def call(self, method: str, request: Any, *, streaming: bool) -> None:
        serialize = (lambda b: b) if isinstance(request, bytes) else type(request).SerializeToString
        make = self.channel.unary_stream if streaming else self.channel.unary_unary
        stub = make(SERVICE + method, request_serializer=serialize, response_deserializer=lambda b: b)
        self.report.calls += 1
        label = f"{method}({request!r:.300})"
        try:
            answer = stub(request, timeout=self.timeout)
            messages = [pb.GenerateResponse.FromString(m) for m in answer] if streaming else [answer]
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code, messages = e.code(), []
            if code not in ALLOWED:
                self.report.failures.append(f"{label}: {code.name} {e.details()!r}")
        self.report.codes[code.name] += 1
        if streaming and code == grpc.StatusCode.OK:
            ended = [m for m in messages if m.finish_reason]
            if not ended:
                self.report.failures.append(f"{label}: the stream ended without a finish_reason")


def _fuzz_method(caller: _Caller, method: str, strategy: st.SearchStrategy, streaming: bool, seed: int,
                 common: dict[str, Any]) -> None:
    @hypothesis_seed(seed)
    @settings(**common)
    @given(request=strategy)
    def one(request: Any) -> None:
        caller.call(method, request, streaming=streaming)
    one()


def run(target: str, model: str, examples: int, seed: int = 0, timeout: float = 120.0) -> Report:
    """``examples`` generated calls per kind (Generate, Tokenize, Detokenize, raw bytes) against ``target``."""
    report = Report()
    common = dict(max_examples=examples, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
    with grpc.insecure_channel(target) as channel:
        caller = _Caller(channel, report, timeout)
        kinds = {
            "Generate": (generate_requests(model), True),
            "Tokenize": (tokenize_requests(model), False),
            "Detokenize": (detokenize_requests(model), False),
        }
        for method, (strategy, streaming) in kinds.items():
            _fuzz_method(caller, method, strategy, streaming, seed, common)

        streaming = {m.name: m.server_streaming for m in pb.DESCRIPTOR.services_by_name["PDServe"].methods}

        @hypothesis_seed(seed)
        @settings(**common)
        @given(method=st.sampled_from(sorted(streaming)), data=st.binary(max_size=200))
        def raw(method: str, data: bytes) -> None:
            caller.call(method, data, streaming=streaming[method])
        raw()

        still = Report()
        _Caller(channel, still, timeout).call(
            "Generate", pb.GenerateRequest(text="Hi", sampling_params=pb.SamplingParams(max_tokens=2)), streaming=True)
        if still.codes != {"OK": 1} or still.failures:
            report.failures.append(f"the server no longer generates: {still.summary()} {still.failures}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC server")
    parser.add_argument("--examples", type=int, default=200, help="generated calls per kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        listed = channel.unary_unary(SERVICE + "ListModels", request_serializer=pb.ListModelsRequest.SerializeToString,
                                     response_deserializer=pb.ListModelsResponse.FromString)
        model = listed(pb.ListModelsRequest(), timeout=30).models[0].id
    report = run(args.target, model, args.examples, args.seed)
    for failure in report.failures:
        print("FAIL", failure)
    print("PASS" if not report.failures else "FAIL", report.summary())
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
