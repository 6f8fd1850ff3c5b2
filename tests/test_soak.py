"""The short soak (issue #19 item 3): ``tools/soak.py`` against ``pdserve serve`` on the
bundled model in fp32, started here as a user would (the CLI, its default admission rule).

8 running sequences (``--max-num-seqs 8``, so the admission limit is 16) at concurrency 8:
200 streaming requests after a 16-request warm-up (mixed lengths, n = 2, stop strings,
client cancellations), then a burst of 48 at once. Every soak criterion must pass: 0 lost,
0 errors, KV and queues back to 0, RSS within 5 % of the warm-up's, 429 + Retry-After for
the burst's excess and the admitted ones' p99 TTFT within 3 x the soak's p99 end-to-end
latency (with no admission limit the last of 48 would wait about 6 rounds of 8). About a
minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import soak  # noqa: E402  (tools/ is not a package)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def dev_server(tmp_path):
    path = tmp_path / "server.log"
    log = open(path, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--dtype", "float32", "--port", "0",
                             "--max-num-seqs", "8", "--kv-cache-memory-gb", "0.25", "--log-level", "warning"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    # read the log through its own handle: the server and its engine process write at the offset they share
    # with `log`, so moving that offset would let their next lines overwrite earlier ones
    try:
        line = proc.stdout.readline()
        assert line.startswith("pdserve: serving pdserve-mini at http://127.0.0.1:"), line + path.read_text()
        yield line.split(" at ")[1].split()[0], proc.pid
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        err = path.read_text()
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_short_soak_on_the_dev_server(dev_server, tmp_path, capsys):
    url, pid = dev_server
    out = tmp_path / "report.json"
    code = soak.main(["--base-url", url, "--requests", "200", "--concurrency", "8", "--warmup", "16",
                      "--max-tokens", "4:24", "--burst", "48", "--burst-ttft-factor", "3", "--server-pid", str(pid),
                      "--timeout", "120", "--json", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    report = json.loads(out.read_text())
    assert code == 0 and report["passed"], printed
    assert all(report["criteria"].values()) and len(report["criteria"]) == 9
    main, burst = report["soak"], report["burst"]
    assert main["completed"] + main["cancelled"] == 200 and main["cancelled"] > 0
    assert burst["status_429"] > 0 and burst["admitted"] + burst["status_429"] == 48
    assert len(report["rss"]["after_soak_bytes"]) >= 2  # the server and its engine process (and spawn's tracker)


def test_check_events_finds_broken_streams():
    """The stream checks themselves: a complete stream passes, each kind of damage is named."""
    spec = soak.Spec(soak.COMPLETIONS, {}, max_tokens=2, n=1, cancel_after=None)

    def chunk(text, reason=None):
        return json.dumps({"id": "c", "choices": [{"index": 0, "text": text, "finish_reason": reason,
                                                   "logprobs": {"tokens": [text]}}]})

    usage = json.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    good = [chunk("a"), chunk("b", "length"), usage, "[DONE]"]
    assert soak.check_events(spec, good) is None
    assert "[DONE]" in soak.check_events(spec, good[:-1])
    assert "finished with []" in soak.check_events(spec, [chunk("a"), chunk("b"), usage, "[DONE]"])
    assert "after 1 tokens" in soak.check_events(spec, [chunk("a", "length"), usage, "[DONE]"])
    assert "usage" in soak.check_events(spec, [chunk("a"), chunk("b", "length"), "[DONE]"])
    error = json.dumps({"error": {"message": "x", "type": "server_error", "param": None, "code": None}})
    assert "error event" in soak.check_events(spec, [chunk("a"), error, "[DONE]"])
