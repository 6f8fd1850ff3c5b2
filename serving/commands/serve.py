"""``pdserve serve``: the OpenAI-compatible HTTP server over the in-process engine.

    pdserve serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--max-body-bytes N] [--grpc-port N] [--log-level info] [engine options...]

Order of work: check the options, load the tokenizer from the model directory, bind
the port, build ``AsyncEngine(EngineArgs.from_cli_args(ns), process=True)`` (the engine in a process
of its own; ``--no-engine-process``: a thread here) and ``await start()``,
then run uvicorn on the bound socket and print
``pdserve: serving MODEL at http://HOST:PORT (OpenAI API under /v1)`` once it accepts
connections. SIGINT/SIGTERM stop it gracefully: uvicorn stops accepting and lets
running requests finish for ``--graceful-shutdown-timeout`` seconds (then cancels
them), after which ``engine.shutdown()`` runs; a second SIGINT skips the wait. A
missing or broken model directory, a port in use, or an engine that fails to load is
a one-line error with exit status 2. The API key may also come from ``PDSERVE_API_KEY``.
Admission: past ``--max-num-seqs`` + ``--max-waiting-requests`` sequences in flight (default
``2 × max_num_seqs``) requests are answered 429 with ``Retry-After`` (``engine.async_engine``).
With ``--grpc-port N`` the gRPC API (``serving.grpc_server``) also listens on HOST:N,
in the same event loop over the same engine, tokenizer and metrics, and prints
``pdserve: gRPC API (pdserve.v1.PDServe) at HOST:PORT`` when started; it stops after
uvicorn, giving its running calls the same graceful timeout.
Access lines (JSON) go to stderr via the ``pdserve.access`` logger instead of uvicorn's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any, Iterator

from engine.args import EngineArgs
from serving.cli import CLIError

logger = logging.getLogger("pdserve.serve")

LOG_LEVELS = ("debug", "info", "warning", "error")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' under /v1/ (default: $PDSERVE_API_KEY, else none)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest accepted request body (default: 4 MiB)")
    p.add_argument("--graceful-shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may take to finish after SIGINT/SIGTERM")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the gRPC API on this port, same host (0 picks a free one; default: off)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own, apart from the HTTP/gRPC side's Python "
                        "(--no-engine-process: a thread of the server's process)")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("pdserve.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the line is JSON already
    access.addHandler(handler)
    access.propagate = False


def _engine_args(ns: argparse.Namespace) -> EngineArgs:
    try:
        return EngineArgs.from_cli_args(ns)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _load_tokenizer(model_dir: str) -> Any:
    from engine.tokenizer import TokenizerLoadError, load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except TokenizerLoadError as e:
        raise CLIError(f"cannot serve {model_dir!r}: {e}") from e


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e}") from e
    sock.set_inheritable(True)
    return sock


def _create_engine(args: EngineArgs, process: bool) -> Any:
    """The engine client (imported here: it pulls torch)."""
    from engine.async_engine import AsyncEngine

    return AsyncEngine(args, process=process)


@contextlib.contextmanager
def _engine_failures(model: str) -> Iterator[None]:
    """Any failure while loading or starting the model is a one-line CLI error (traceback at debug level)."""
    try:
        yield
    except CLIError:
        raise
    except Exception as e:  # the engine may fail in many ways on a broken checkpoint; all mean "cannot serve"
        from engine.outputs import EngineStartError

        logger.debug("engine failed to start", exc_info=True)
        cause = str(e) if isinstance(e, EngineStartError) else f"{type(e).__name__}: {e}"  # named by the process
        raise CLIError(f"cannot load the model in {model!r}: {cause}") from e


def run(ns: argparse.Namespace) -> int:
    _configure_logging(ns.log_level)
    args = _engine_args(ns)
    if not os.path.isdir(args.model):
        raise CLIError(f"model directory {args.model!r} does not exist (pass --model DIR)")
    tokenizer = _load_tokenizer(args.model)
    sock = _bind(ns.host, ns.port)
    try:
        with _engine_failures(args.model):
            engine = _create_engine(args, ns.engine_process)
        return asyncio.run(_serve(engine, tokenizer, sock, ns, args.model))
    finally:
        sock.close()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def run_uvicorn(app: Any, sock: socket.socket, log_level: str, graceful_s: float, ready_line: str) -> None:
    """Serve ``app`` on the bound ``sock`` until SIGINT/SIGTERM (a second one forces the exit), printing
    ``ready_line`` once uvicorn accepts connections. The signals are handled here, not by uvicorn, so
    the caller's cleanup (engine, pools) runs after the server has stopped, never killed with it."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=graceful_s))
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        server.force_exit = server.should_exit
        server.should_exit = True

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        print(ready_line, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.ensure_future(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _serve(engine: Any, tokenizer: Any, sock: socket.socket, ns: argparse.Namespace, model_dir: str) -> int:
    from serving.metrics import ServingMetrics
    from serving.openai_api import DEFAULT_MAX_BODY_BYTES, build_app

    try:
        with _engine_failures(model_dir):
            await engine.start()
        metrics = ServingMetrics(engine.stats)  # one registry for HTTP and gRPC (label protocol)
        app = build_app(engine, tokenizer, api_key=ns.api_key or os.environ.get("PDSERVE_API_KEY") or None,
                        max_body_bytes=ns.max_body_bytes or DEFAULT_MAX_BODY_BYTES, metrics=metrics)
        grpc_server = None if ns.grpc_port is None else await _start_grpc(engine, tokenizer, metrics, ns.host,
                                                                          ns.grpc_port)
        try:
            await run_uvicorn(app, sock, ns.log_level, ns.graceful_shutdown_timeout,
                              f"pdserve: serving {engine.model_name} at {_url(sock)} (OpenAI API under /v1)")
        finally:
            if grpc_server is not None:
                await grpc_server.stop(ns.graceful_shutdown_timeout)
    finally:
        await _shutdown(engine, model_dir, ns.graceful_shutdown_timeout)
    return 0


async def _start_grpc(engine: Any, tokenizer: Any, metrics: Any, host: str, port: int) -> Any:
    """The gRPC server beside HTTP in this loop; a bad or busy port is a CLI error."""
    from serving.grpc_server import SERVICE_NAME, start_grpc_server

    if not 0 <= port <= 65535:
        raise CLIError(f"--grpc-port must be in [0, 65535], got {port}")
    try:
        server = await start_grpc_server(engine, tokenizer, metrics, host, port)
    except RuntimeError as e:
        raise CLIError(f"cannot listen for gRPC on {host}:{port}: {e}") from e
    where = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    print(f"pdserve: gRPC API ({SERVICE_NAME}) at {where}", flush=True)
    return server


async def _shutdown(engine: Any, model: str, timeout: float) -> None:
    """``engine.shutdown()``, bounded; failures are logged because the process is exiting anyway."""
    try:
        await asyncio.wait_for(engine.shutdown(), timeout=max(timeout, 1.0))
    except asyncio.TimeoutError:
        logger.error("engine for %s did not shut down within %.0f s; exiting anyway", model, timeout)
    except Exception:  # never mask the error that brought us here, nor hang the exit
        logger.exception("engine for %s failed while shutting down", model)
