"""What ``pdserve bench`` prints and writes: the summary table (one column per run),
the ratios between endpoints for ``--compare``, the ``--json`` document and the
``--plot`` PNG (latency CDFs; for a sweep, throughput and p99 latency per level).
matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from serving.bench.client import RequestRecord
from serving.bench.metrics import LATENCIES, PERCENTILES, latency_samples

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}


@dataclasses.dataclass
class Run:
    endpoint: str  # "A", "B", ...
    base_url: str
    model: str | None
    level_name: str  # "concurrency" or "request_rate"
    level: float
    summary: dict[str, Any]
    records: list[RequestRecord]

    @property
    def title(self) -> str:
        short = "C" if self.level_name == "concurrency" else "rate"
        return f"{self.endpoint} {short}={self.level:g}"

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "base_url": self.base_url, "model": self.model,
                self.level_name: json_level(self.level), "summary": self.summary,
                "requests": [r.to_json() for r in self.records]}


def json_level(level: float) -> float | str:
    """A level as JSON can hold it: ``inf`` (all requests at once) becomes the string "inf"."""
    return level if math.isfinite(level) else "inf"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(runs: list[Run]) -> str:
    """Rows are metrics, columns are runs, so endpoints at the same level sit side by side."""
    rows: list[tuple[str, list[str]]] = [
        ("completed / failed", [f"{r.summary['completed']} / {r.summary['failed']}" for r in runs]),
        ("duration (s)", [fmt(r.summary["duration_s"]) for r in runs]),
        ("requests/s", [fmt(r.summary["request_throughput"], 3) for r in runs]),
        ("output tok/s", [fmt(r.summary["output_throughput"]) for r in runs]),
        ("total tok/s", [fmt(r.summary["total_token_throughput"]) for r in runs]),
        ("input / output tokens", [f"{r.summary['total_input_tokens']} / {r.summary['total_output_tokens']}"
                                   for r in runs]),
    ]
    for name in LATENCIES:
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            rows.append((f"{LATENCY_NAMES[name]} {stat} (ms)", [fmt(r.summary[f"{name}_ms"][stat]) for r in runs]))
    kinds = sorted({k for r in runs for k in r.summary["errors"]})
    for kind in kinds:
        rows.append((f"errors: {kind}", [str(r.summary["errors"].get(kind, 0)) for r in runs]))
    header = ("", [r.title for r in runs])
    width0 = max(len(name) for name, _ in [header, *rows])
    widths = [max(len(cells[i]) for _, cells in [header, *rows]) for i in range(len(runs))]
    lines = []
    for name, cells in [header, *rows]:
        lines.append("  ".join([name.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths))]).rstrip())
    lines.insert(1, "-" * len(max(lines, key=len)))
    return "\n".join(lines)


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def compare_ratios(runs: list[Run]) -> list[dict[str, Any]]:
    """For each level, every endpoint's throughput and mean latencies relative to the first endpoint's."""
    out = []
    for base in (r for r in runs if r.endpoint == "A"):
        for r in runs:
            if r.level != base.level or r.level_name != base.level_name:
                continue
            s, b = r.summary, base.summary
            out.append({"endpoint": r.endpoint, base.level_name: json_level(base.level),
                        "output_throughput": ratio(s["output_throughput"], b["output_throughput"]),
                        "request_throughput": ratio(s["request_throughput"], b["request_throughput"]),
                        **{f"{n}_mean": ratio(s[f"{n}_ms"]["mean"], b[f"{n}_ms"]["mean"]) for n in LATENCIES}})
    return out


def ratios_table(ratios: list[dict[str, Any]], endpoints: list[tuple[str, str]]) -> str:
    lines = ["relative to A (" + endpoints[0][1] + "); " +
             ", ".join(f"{label} = {url}" for label, url in endpoints[1:])]
    for row in ratios:
        key = "C" if "concurrency" in row else "rate"
        level = row["concurrency" if key == "C" else "request_rate"]
        cells = [f"output tok/s x{fmt(row['output_throughput'])}", f"requests/s x{fmt(row['request_throughput'])}",
                 *(f"{LATENCY_NAMES[n]} mean x{fmt(row[f'{n}_mean'])}" for n in ("ttft", "tpot", "e2el"))]
        lines.append(f"  {key}={level} {row['endpoint']}: " + "  ".join(cells))
    return "\n".join(lines)


def write_json(path: str, config: dict[str, Any], runs: list[Run], ratios: list[dict[str, Any]]) -> None:
    doc = {"config": config, "runs": [r.to_json() for r in runs], "ratios": ratios}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_plot(path: str, runs: list[Run]) -> None:
    """Latency CDFs (TTFT, TPOT, E2E) per run; with several levels also throughput and p99 latency per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    levels = sorted({r.level for r in runs})
    sweep = len(levels) > 1
    fig, axes = plt.subplots(2 if sweep else 1, 3, figsize=(15, 8.5 if sweep else 4.5), squeeze=False)
    for ax, name in zip(axes[0], ("ttft", "tpot", "e2el")):
        for r in runs:
            v = np.sort(np.asarray(latency_samples(r.records)[name]) * 1000.0)
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=r.title)
        ax.set(title=f"{LATENCY_NAMES[name]} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    if sweep:
        xlabel = "concurrency" if runs[0].level_name == "concurrency" else "request rate (req/s)"
        panels = (("output_throughput", None, "output tok/s"), ("ttft_ms", "p99", "p99 TTFT (ms)"),
                  ("tpot_ms", "p99", "p99 TPOT (ms)"))
        for ax, (key, stat, label) in zip(axes[1], panels):
            for endpoint in dict.fromkeys(r.endpoint for r in runs):
                pts = [(r.level, r.summary[key] if stat is None else r.summary[key][stat])
                       for r in runs if r.endpoint == endpoint]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=endpoint)
            ax.set(title=f"{label} vs {xlabel}", xlabel=xlabel, ylabel=label, xticks=levels)
            ax.grid(alpha=0.3)
        axes[1][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
