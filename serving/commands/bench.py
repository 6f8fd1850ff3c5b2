"""``pdserve bench``: benchmark one or more OpenAI-compatible servers with streaming requests.

    pdserve bench --base-url URL [--compare URL2 ...] [--model NAME]
                  [--dataset random|shared-prefix|FILE.jsonl] [--input-len N] [--output-len N]
                  [--num-prompts N] [--concurrency C[,C2,...] | --request-rate R[,R2,...]]
                  [--endpoint completions|chat] [--ignore-eos] [--seed S] [--timeout S]
                  [--json OUT] [--plot OUT.png]

Every endpoint gets the same prompts; with ``--compare`` the runs alternate between
endpoints at each level (A, B, A, B ...) so that they share the machine's noise, and
the ratios to the first endpoint are printed. Exit status: 0 when every request
succeeded, 1 when any failed (the report is still printed and written), 2 for bad
options or an unreadable dataset. Metric definitions: ``serving.bench.metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import string
import sys
from typing import Any

from serving.cli import CLIError


def _levels(kind: type, name: str):
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list of numbers, got {text!r}")
        if not values or any(not v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"{name} values must be positive, got {text!r}")
        return values
    return parse


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="benchmark OpenAI-compatible servers (throughput, TTFT, TPOT, ITL)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is ok)")
    p.add_argument("--compare", nargs="+", default=[], metavar="URL",
                   help="more servers to run the same workload against, side by side")
    p.add_argument("--model", default=None, help="model name to request (default: the first of each server's /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--dataset", default="random", help="random, shared-prefix, or a JSONL file of "
                   '{"prompt": TEXT or [ids], "max_tokens": N} lines')
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random and shared-prefix)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request (JSONL default too)")
    p.add_argument("--prefix-len", type=int, default=None,
                   help="shared-prefix: tokens common to all prompts (default: half of --input-len)")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="random token-id prompts draw ids from [0, N); at most the model's vocabulary")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per run (per endpoint and level)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_levels(int, "--concurrency"), default=None, metavar="C[,C2,...]",
                      help="requests in flight; a list is a sweep (default: all requests at once)")
    load.add_argument("--request-rate", type=_levels(float, "--request-rate"), default=None, metavar="R[,R2,...]",
                      help="Poisson arrivals at R requests/s (inf: all at once); a list is a sweep")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so every request makes max_tokens")
    p.add_argument("--seed", type=int, default=0, help="seed for the prompts (each level its own) and the arrival times")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded requests sent to each server first")
    p.add_argument("--json", default=None, metavar="OUT", help="write config, summaries and per-request records")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write latency CDFs (and sweep curves); needs matplotlib")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _check(ns: argparse.Namespace) -> None:
    for name in ("input_len", "output_len", "num_prompts", "vocab_size"):
        if getattr(ns, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if ns.warmup < 0:
        raise CLIError("--warmup must be at least 0")
    if ns.seed < 0:
        raise CLIError("--seed must be at least 0")
    if not ns.timeout > 0:
        raise CLIError("--timeout must be positive")
    for url in (ns.base_url, *ns.compare):
        if not url.startswith(("http://", "https://")):
            raise CLIError(f"{url!r} is not an http(s) URL")
    if ns.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the run, not after it)
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install matplotlib") from None


def run(ns: argparse.Namespace) -> int:
    from serving.bench.workload import WorkloadError, build_workload

    _check(ns)
    prefix_len = ns.prefix_len if ns.prefix_len is not None else ns.input_len // 2
    if ns.request_rate is not None:
        level_name, levels = "request_rate", ns.request_rate
    else:
        level_name, levels = "concurrency", ns.concurrency or [ns.num_prompts]

    def workload(seed: tuple[int, int], num_prompts: int) -> list:
        return build_workload(ns.dataset, num_prompts=num_prompts, input_len=ns.input_len,
                              output_len=ns.output_len, seed=seed, vocab_size=ns.vocab_size,
                              prefix_len=prefix_len, chat=ns.endpoint == "chat")

    # Each level its own prompts, the same for every endpoint at that level, and the warm-up others again: a
    # server with prefix caching must not find a level's prompts cached by an earlier level or the warm-up
    # (vLLM's CPU backend serves MLA models with prefix caching off; pdserve has it on). A dataset file's
    # prompts are the same at every level.
    try:
        per_level = [workload((ns.seed, i + 1), ns.num_prompts) for i in range(len(levels))]
        warmup = workload((ns.seed, 0), ns.warmup)
    except WorkloadError as e:
        raise CLIError(str(e)) from e
    return asyncio.run(_bench(ns, level_name, levels, per_level, warmup, prefix_len))


async def _bench(ns: argparse.Namespace, level_name: str, levels: list, per_level: list[list], warmup: list,
                 prefix_len: int) -> int:
    from serving.bench import client as bc
    from serving.bench.metrics import summarize
    from serving.bench.report import (Run, compare_ratios, json_level, ratios_table, summary_table, write_json,
                                      write_plot)

    urls = [bc.normalize_base_url(u) for u in (ns.base_url, *ns.compare)]
    labels = list(string.ascii_uppercase[:len(urls)]) if len(urls) <= 26 else [str(i) for i in range(len(urls))]
    chat = ns.endpoint == "chat"
    runs: list[Run] = []
    async with bc.make_client(ns.timeout) as http:
        models = [ns.model or await bc.first_model(http, url) for url in urls]
        for label, url, model in zip(labels, urls, models):
            shown = model or "(unknown: GET /v1/models failed; requests name no model)"
            print(f"{label}: {url}  model {shown}", flush=True)
            for spec in warmup:
                await bc.send_request(http, url, -1, spec, model, chat=chat,
                                      ignore_eos=ns.ignore_eos, timeout=ns.timeout, run_start=0.0)
        for level, specs in zip(levels, per_level):
            for label, url, model in zip(labels, urls, models):
                result = await bc.run_level(
                    http, url, model, specs, concurrency=int(level) if level_name == "concurrency" else None,
                    request_rate=level if level_name == "request_rate" else None, chat=chat,
                    ignore_eos=ns.ignore_eos, timeout=ns.timeout, seed=ns.seed, progress=not ns.no_progress,
                    desc=f"{label} {level_name}={level:g}")
                runs.append(Run(label, url, model, level_name, level, summarize(result.records, result.duration_s),
                                result.records))
    print(summary_table(runs))
    ratios = compare_ratios(runs) if len(urls) > 1 else []
    if ratios:
        print()
        print(ratios_table(ratios, list(zip(labels, urls))))
    failed = sum(r.summary["failed"] for r in runs)
    if failed:
        kinds = {}
        for r in runs:
            for kind, n in r.summary["errors"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        print(f"pdserve bench: {failed} of {sum(len(r.records) for r in runs)} requests failed: "
              + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), file=sys.stderr)
    if ns.json:
        config = {k: v for k, v in vars(ns).items() if k != "func"}
        config.update(endpoints=[{"label": lb, "base_url": u, "model": m} for lb, u, m in zip(labels, urls, models)],
                      prefix_len=prefix_len if ns.dataset == "shared-prefix" else None,
                      level_name=level_name, levels=[json_level(x) for x in levels])
        if config["request_rate"] is not None:
            config["request_rate"] = [json_level(x) for x in config["request_rate"]]
        write_json(ns.json, config, runs, ratios)
    if ns.plot:
        write_plot(ns.plot, runs)
    return 1 if failed else 0
