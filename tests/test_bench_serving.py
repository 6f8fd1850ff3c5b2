"""``tools/bench_serving.py`` on a tiny setting, as CI runs every benchmark script: pdserve and the
transformers baseline really serve the workload (capped at AVX2 by ``--max-cpu-isa avx2``, as on a CPU without
AVX-512), a vLLM without its venv is reported as not run (and fails the exit status), the docs block is
regenerated, and no server outlives the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from engine.dtype_choice import cpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "bench_serving.py")
BEGIN, END = "<!-- bench_serving:begin -->", "<!-- bench_serving:end -->"
DOCS = f"# Benchmarks\n\nbefore\n{BEGIN}\n(not generated yet)\n{END}\nafter\n"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tool():
    """The script as a module (it puts tools/ on sys.path for ``machine``)."""
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_tiny_run_serves_two_and_reports_vllm_not_run(tool, tmp_path):
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text(DOCS)
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_VENV"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "tiny", "--servers", "pdserve,transformers,vllm",
         "--vllm-venv", str(tmp_path / "no-vllm-venv"), "--concurrency", "1,2", "--num-prompts", "2",
         "--hf-num-prompts", "2", "--input-len", "16", "--output-len", "4", "--start-timeout", "120",
         "--request-timeout", "60", "--work-dir", str(tmp_path / "work"), "--json", str(out),
         "--write-docs", str(docs), "--max-cpu-isa", "avx2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=220)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 1, log  # vLLM was asked for and could not run
    assert "Traceback" not in proc.stdout + proc.stderr, log
    assert "vLLM CPU: not run: no vLLM venv (build it with tools/peers/setup_vllm.sh)" in proc.stderr

    doc = json.loads(out.read_text())
    servers = {s["name"]: s for s in doc["servers"]}
    assert list(servers) == ["pdserve", "transformers", "vllm"]
    for name in ("pdserve", "transformers"):
        srv = servers[name]
        assert srv["status"] == "ok", srv["reason"]
        assert f"--dtype {doc['dtype']}" in " ".join(srv["cmd"])  # the one resolved dtype for every server
        assert srv["env"] | tool.AVX2_CAP_ENV == srv["env"]  # torch, oneDNN and pdserve capped at AVX2
        assert [r["concurrency"] for r in srv["runs"]] == [1, 2]
        seeds = [r["command"].split(" --seed ")[1].split()[0] for r in srv["runs"]]
        if name == "pdserve":  # its /metrics counts the prompt tokens found cached: none, every prompt is new
            assert [r["prefix_cache_hit_tokens"] for r in srv["runs"]] == [0, 0]
        assert seeds == [str(tool.level_seed(0, 1)), str(tool.level_seed(0, 2))] and seeds[0] != seeds[1]
        for run in srv["runs"]:
            s = run["summary"]
            assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 0, 32, 8)
            assert s["output_throughput"] > 0 and s["ttft_ms"]["p99"] > 0 and s["tpot_ms"]["p99"] > 0
    vllm = servers["vllm"]
    assert (vllm["status"], vllm["runs"], vllm["pid"]) == ("not run", [], None)
    assert [(r["concurrency"], r["vs"], r["output_throughput"] > 0) for r in doc["ratios"] if r["vs"] == "transformers"
            ] == [(1, "transformers", True), (2, "transformers", True)]

    text = docs.read_text()
    assert text.startswith(f"# Benchmarks\n\nbefore\n{BEGIN}\n") and text.endswith(f"{END}\nafter\n")
    block = text.split(BEGIN)[1].split(END)[0]
    assert block.strip() == doc["markdown"] and "(not generated yet)" not in block
    assert tool.cpu_description() in block and doc["dtype"] in block
    assert "every server capped at AVX2" in block and "PDSERVE_CPU_MAX_ISA=avx2 .venv/bin/pdserve serve" in block
    if "avx2" in (cpu_flags() or ()):  # x86: `auto` resolved as on a CPU without AVX512-BF16
        assert doc["dtype"] == "float32" and "PDSERVE_CPU_MAX_ISA=avx2" in doc["dtype_reason"]
    assert "| 1 | pdserve | " in block and "| 2 | transformers " in block
    assert "| 1 | vLLM CPU | not run: no vLLM venv (build it with tools/peers/setup_vllm.sh) |" in block
    # the commands, with the checkpoint as $CKPT
    assert "make-random $CKPT --preset tiny" in block and "pdserve serve --model $CKPT" in block
    assert "hf_server.py --model $CKPT" in block and "pdserve bench --base-url" in block

    for name in ("pdserve", "transformers"):  # stopped, with their whole process group
        srv = servers[name]
        with pytest.raises(ProcessLookupError):
            os.killpg(srv["pid"], 0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv["port"]), timeout=2).close()


def test_docs_without_markers_are_refused_before_anything_runs(tmp_path):
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\nno markers\n")
    proc = subprocess.run([sys.executable, SCRIPT, "--write-docs", str(docs), "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"needs exactly one {BEGIN}" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_a_level_that_resends_prompts_is_an_error(tool, tmp_path):
    """A server with prefix caching answers resent prompts from its cache: the tool reads the hit counter
    around each level and calls a level with hits an error (the fake engine caches 16-token blocks)."""
    from fake_engine import FakeEngine, make_model_dir, running_server
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(make_model_dir(str(tmp_path / "model")))
    args = argparse.Namespace(input_len=40, output_len=2, seed=0, request_timeout=60, hf_request_timeout=60)
    with running_server(FakeEngine(tok, token_delay=0.001), tok) as server:
        srv = tool.Server("pdserve", "pdserve", port=int(server.url.rsplit(":", 1)[1]))
        first = tool.run_bench(srv, 2, 4, 256, args, str(tmp_path), tool.Shown())
        again = tool.run_bench(srv, 2, 4, 256, args, str(tmp_path), tool.Shown())  # the same seed: the same prompts
    assert first["summary"]["completed"] == 4 and first["prefix_cache_hit_tokens"] == 0 and first["error"] is None
    assert again["prefix_cache_hit_tokens"] >= 4 * 32 and "came from the prefix cache" in again["error"]


def test_prompts_per_level(tool):
    assert [tool.default_num_prompts("pdserve", c) for c in (1, 8, 32, 64)] == [16, 64, 64, 128]
    assert [tool.default_num_prompts("transformers", c) for c in (1, 8, 32, 64)] == [4, 16, 32, 64]
    assert tool.prompts_per_level([5], "vllm", [1, 8]) == [5, 5]
    assert tool.prompts_per_level([3, 7], "transformers", [1, 8]) == [3, 7]


def test_rounds_report_each_rounds_ratios_and_their_median(tool):
    """--rounds: each round's pdserve / vLLM ratios come from that round's two runs; the median row is the
    median of the rounds' ratios, each metric on its own; the tables get a round column."""
    def server(name, rnd, tps, ttft, tpot):
        summary = {"output_throughput": tps, "ttft_ms": {"p50": ttft, "p99": ttft},
                   "tpot_ms": {"p50": tpot, "p99": tpot}, "failed": 0, "num_requests": 4}
        label = "pdserve" if name == "pdserve" else "vLLM CPU"
        return tool.Server(name, label, status="ok", round=rnd, tag=f"{name}-r{rnd}",
                           runs=[{"concurrency": 8, "summary": summary, "error": None}])
    servers = [server("pdserve", 1, 300, 600, 20), server("vllm", 1, 200, 900, 30),
               server("vllm", 2, 250, 800, 25), server("pdserve", 2, 260, 700, 22),
               server("pdserve", 3, 330, 640, 19), server("vllm", 3, 210, 1000, 31)]
    rows = tool.round_ratios(servers, [8])
    assert [r["round"] for r in rows] == [1, 2, 3, "median"]
    tps = [300 / 200, 260 / 250, 330 / 210]
    assert [r["output_throughput"] for r in rows[:3]] == pytest.approx(tps)
    assert rows[3]["output_throughput"] == pytest.approx(sorted(tps)[1])
    assert rows[3]["ttft_p99"] == pytest.approx(sorted([600 / 900, 700 / 800, 640 / 1000])[1])
    table = tool.ratios_table(rows)
    assert table.splitlines()[0] == "| round | C | pdserve / | output tok/s | TTFT p99 | TPOT p99 |"
    assert table.splitlines()[-1].startswith(f"| median | 8 | vLLM CPU | {sorted(tps)[1]:.2f}x |")
    assert "| 2 | 8 | vLLM CPU | 250.0 |" in tool.results_table(servers, [8])
    # one round: the tables as before, no round column
    one = tool.ratios_table(tool.round_ratios(servers[:2], [8])).splitlines()
    assert one[0] == "| C | pdserve / | output tok/s | TTFT p99 | TPOT p99 |"
    assert one[2] == "| 8 | vLLM CPU | 1.50x | 0.67x | 0.67x |"
