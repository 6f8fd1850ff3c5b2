"""The engine in a process of its own (``engine.engine_process``, ``pdserve serve``'s default).

Real spawned engine processes on the tiny checkpoint: the streams carry the same tokens as the
in-process engine, errors cross the pipe with their type, an abort frees the blocks, a crashed
engine process fails the open streams and the health check instead of hanging them, a model that
does not load is the start error, and an engine whose server dies goes away by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from engine import SamplingParams
from engine.args import EngineArgs
from engine.async_engine import AsyncEngine
from engine.outputs import EngineError, EngineStartError, GenerateRequest
from engine.sampling_params import SamplingParamError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [3, 4]]


def _args(model: str) -> EngineArgs:
    return EngineArgs(model=model, dtype="float32", block_size=8, num_kv_blocks=32)


async def _tokens(engine: AsyncEngine, rid: str, prompt: list[int], params=GREEDY) -> list[int]:
    tokens = []
    async for out in engine.generate(GenerateRequest(rid, prompt, params)):
        tokens += out.outputs[0].token_ids
    return tokens


def _crossing(engine: AsyncEngine, look) -> list:
    """``look(output)`` for every step output that crosses the engine process's pipe, as it crossed (before
    the server side puts anything back), in a list that fills as they come."""
    crossed: list = []
    receive = engine.loop._receive

    def spy(message: tuple) -> None:
        if message[0] == "step":
            crossed.extend(look(out) for out in message[1])
        receive(message)

    engine.loop._receive = spy
    return crossed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_streams_errors_aborts_and_stats_match_the_in_process_engine(tiny_checkpoint):
    async def run(process: bool) -> dict:
        engine = AsyncEngine(_args(tiny_checkpoint), process=process)
        await engine.start()
        try:
            got = await asyncio.gather(*(_tokens(engine, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            with pytest.raises(SamplingParamError) as bad:  # the type the API turns into a 400
                await _tokens(engine, "bad", [])
            # a long request dropped after its first delta: its blocks come back
            stream = engine.generate(GenerateRequest("long", [1, 2, 3], SamplingParams(max_tokens=200,
                                                                                         ignore_eos=True)))
            await stream.__anext__()
            await stream.aclose()
            after = await _tokens(engine, "after", PROMPTS[0])  # and the engine still serves
            for _ in range(100):
                if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                    break
                await asyncio.sleep(0.05)
            return dict(tokens=got, after=after, bad=bad.value.param, stats=engine.stats(),
                        info=(engine.max_model_len, engine.eos_token_ids, engine.dtype_choice),
                        healthy=await engine.health())
        finally:
            await engine.shutdown()

    apart, here = asyncio.run(run(True)), asyncio.run(run(False))
    assert apart["tokens"] == here["tokens"] and all(len(t) == 10 for t in apart["tokens"])
    assert apart["after"] == here["tokens"][0]
    assert apart["bad"] == "prompt" and apart["healthy"]
    assert apart["info"] == here["info"] and apart["info"][2].dtype == "float32"
    stats = apart["stats"]
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.kv_blocks_total == 32
    assert stats.prefix_cache_queries == here["stats"].prefix_cache_queries > 0


def test_deltas_carry_their_prompt_that_does_not_cross_the_pipe_and_is_forgotten(tiny_checkpoint):
    """The engine process sends each step's outputs without the prompts' token ids (the server holds them
    from ``add``); every delta the server hands out still carries its prompt, and none is kept after its
    request ends: finished, aborted mid-stream, or refused."""
    async def run() -> tuple[list, list, dict]:
        engine = AsyncEngine(_args(tiny_checkpoint), process=True)
        await engine.start()
        crossed = _crossing(engine, lambda out: out.prompt_token_ids)
        try:
            seen = []
            for i, p in enumerate(PROMPTS):
                async for out in engine.generate(GenerateRequest(f"r{i}", p, GREEDY)):
                    seen.append((out.prompt_token_ids, p))
            stream = engine.generate(GenerateRequest("long", [1, 2, 3], SamplingParams(max_tokens=200,
                                                                                     ignore_eos=True)))
            seen.append(((await stream.__anext__()).prompt_token_ids, [1, 2, 3]))
            await stream.aclose()
            with pytest.raises(SamplingParamError):
                await _tokens(engine, "bad", [])
            for _ in range(100):
                if engine.stats().num_running == 0:
                    break
                await asyncio.sleep(0.05)
            return crossed, seen, dict(engine.loop._prompts)
        finally:
            await engine.shutdown()

    crossed, seen, kept = asyncio.run(run())
    assert len(seen) >= 10 * len(PROMPTS) and all(got == want for got, want in seen)
    assert crossed and all(ids is None for ids in crossed)
    assert kept == {}


def test_prompt_logprobs_cross_the_pipe_once_and_every_delta_carries_them(tiny_checkpoint):
    """A prompt's logprobs (echo with logprobs) cross the pipe with the first delta that has them; the server
    puts them in every later delta and forgets them when the request ends (finished, or aborted mid-stream)."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=2)

    async def run() -> tuple[list, dict, tuple, dict]:
        engine = AsyncEngine(_args(tiny_checkpoint), process=True)
        await engine.start()
        crossed = _crossing(engine, lambda out: (out.request_id, out.prompt_logprobs is not None))
        try:
            seen: dict = {}
            for rid, p in (("a", PROMPTS[0]), ("b", PROMPTS[1])):
                async for out in engine.generate(GenerateRequest(rid, p, params)):
                    seen.setdefault(rid, []).append(out.prompt_logprobs)
            stream = engine.generate(GenerateRequest("long", [1, 2, 3], SamplingParams(
                max_tokens=200, ignore_eos=True, prompt_logprobs=1)))
            first, second = await stream.__anext__(), await stream.__anext__()
            await stream.aclose()
            for _ in range(100):
                if engine.stats().num_running == 0:
                    break
                await asyncio.sleep(0.05)
            return crossed, seen, (first.prompt_logprobs, second.prompt_logprobs), dict(engine.loop._prompt_logprobs)
        finally:
            await engine.shutdown()

    crossed, seen, long_deltas, kept = asyncio.run(run())
    for rid, prompt in (("a", PROMPTS[0]), ("b", PROMPTS[1])):
        deltas = seen[rid]
        assert len(deltas) >= 2 and deltas[0] is not None and len(deltas[0]) == len(prompt)
        assert all(d == deltas[0] for d in deltas)
        flags = [sent for r, sent in crossed if r == rid]
        assert len(flags) == len(deltas) and sum(flags) == 1  # every delta crossed, the logprobs with one
    assert long_deltas[0] is not None and long_deltas[1] == long_deltas[0]
    assert kept == {}


def test_the_engine_side_forgets_whose_prompt_logprobs_it_sent_once_they_end(tiny_checkpoint):
    """The engine process's record of which requests' prompt logprobs crossed holds only running ones: a
    finished request and an aborted one (which sends nothing more) leave it."""
    from engine.engine import LLMEngine
    from engine.engine_process import _PipedLoop

    class Pipe:
        def __init__(self):
            self.sent: list = []

        def send(self, message: tuple) -> None:
            self.sent.append(message)

    engine, pipe = LLMEngine(_args(tiny_checkpoint)), Pipe()
    loop = _PipedLoop(engine, pipe)
    engine.add_request("done", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=1))
    engine.add_request("cut", PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True, prompt_logprobs=1))
    loop._publish(engine.step())
    assert loop._sent_prompt_logprobs == {"done", "cut"}
    engine.abort("cut")
    while engine.has_unfinished():
        loop._publish(engine.step())
    assert loop._sent_prompt_logprobs == set()
    carried = [out.request_id for kind, outputs, *_ in pipe.sent if kind == "step" for out in outputs
               if out.prompt_logprobs is not None]
    assert sorted(carried) == ["cut", "done"]


def test_a_killed_engine_process_fails_open_streams_and_health(tiny_checkpoint):
    async def run() -> None:
        engine = AsyncEngine(_args(tiny_checkpoint), process=True)
        await engine.start()
        try:
            stream = engine.generate(GenerateRequest("r", [1, 2, 3], SamplingParams(max_tokens=250,
                                                                                   ignore_eos=True)))
            await stream.__anext__()
            os.kill(engine.loop.pid, signal.SIGKILL)
            with pytest.raises(EngineError, match="engine process exited"):
                async with asyncio.timeout(30):
                    async for _ in stream:
                        pass
            assert not await engine.health()
            with pytest.raises(EngineError):
                await _tokens(engine, "next", [1, 2])
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_a_model_that_does_not_load_is_the_start_error(tiny_checkpoint, tmp_path):
    """A truncated weights file: ``start`` raises the loader's error, named, and no engine is left."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])

    async def run() -> str:
        engine = AsyncEngine(_args(str(broken)), process=True)
        with pytest.raises(EngineStartError) as e:
            await engine.start()
        assert not engine.loop.alive and engine.loop._process.exitcode is not None
        return str(e.value)

    message = asyncio.run(run())
    assert message.startswith("CheckpointError: ") and weights.name in message, message


SERVER = """
import asyncio, sys
from engine.args import EngineArgs
from engine.async_engine import AsyncEngine

async def main():
    engine = AsyncEngine(EngineArgs(model=sys.argv[1], dtype="float32", num_kv_blocks=16), process=True)
    await engine.start()
    print(engine.loop.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_engine_process_ends_when_its_server_is_killed(tiny_checkpoint):
    server = subprocess.Popen([sys.executable, "-c", SERVER, tiny_checkpoint], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        engine_pid = int(server.stdout.readline())
        assert _pid_alive(engine_pid)
    finally:
        server.kill()
        server.wait(30)
    deadline = time.monotonic() + 30
    while _pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(engine_pid), "the engine process outlived its server"
