"""bench.png: decode tokens/s per system and context (the median, a whisker over the spread
min-max of the repetitions), with each system's bandwidth ceiling.

    python bench/chart.py bench/results/bench.json [bench/results/bench.png]

matplotlib comes with the `bench` and `test` extras. Without it the benchmarks still write their
JSON and markdown and skip the chart with one line (`pyplot_or_none`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NO_MATPLOTLIB = ("chart skipped: matplotlib is not installed "
                 "(the bench or test extra draws it: pip install -e \".[bench]\")")


def pyplot_or_none() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _by_context(figures: dict[Any, Any]) -> dict[int, Any]:
    """JSON turns int keys into strings; both are accepted."""
    return {int(k): v for k, v in figures.items()}


def _stat(v: Any) -> tuple[float, float, float]:
    """(median, min, max) of a figure: a Stat dict, or a bare number (older bench.json)."""
    if isinstance(v, dict):
        return v["median"], v["min"], v["max"]
    return float(v), float(v), float(v)


def plot(doc: dict[str, Any], out: Path) -> Path | None:
    """Grouped bars (one group per context, one bar per system) and a tick at each ceiling;
    None, drawing nothing, where matplotlib is absent."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    summary = doc["summary"]
    systems = list(summary)
    decode = {s: _by_context(summary[s]["decode"]) for s in systems}
    ceiling = {s: _by_context(summary[s]["ceiling"]) for s in systems}
    contexts = sorted({c for d in decode.values() for c in d})
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(contexts) * len(systems) / 3), 4.5))
    for i, system in enumerate(systems):
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(contexts))]
        stats = [_stat(decode[system].get(c, 0.0)) for c in contexts]
        ys = [m for m, _, _ in stats]
        spread = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
        bars = ax.bar(xs, ys, width, label=system, yerr=spread, capsize=2,
                      error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
        for x, c in zip(xs, contexts, strict=True):
            if c in ceiling[system]:
                ax.hlines(ceiling[system][c], x - width / 2, x + width / 2, colors="black",
                          linewidth=1.5)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(contexts)), [f"context {c}" for c in contexts])
    ax.set_ylabel("decode tokens/s (batch 1, greedy)")
    m, src = doc["machine"], doc["model"]["source"]
    ax.set_title(f"random-init {src.get('preset')} — {m['cpu']}, "
                 f"{doc['config']['threads']} threads; median of "
                 f"{doc['config'].get('repeats', 1)}, whisker = min-max; black tick = "
                 "bandwidth ceiling",
                 fontsize=9)
    ax.legend(fontsize=8, ncols=min(len(systems), 4), loc="upper center",
              bbox_to_anchor=(0.5, -0.1))  # below the axes: never over a bar or a tick
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        sys.stderr.write("usage: python bench/chart.py BENCH.json [OUT.png]\n")
        return 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) == 2 else src.with_suffix(".png")
    if plot(json.loads(src.read_text()), out) is None:
        sys.stderr.write(NO_MATPLOTLIB + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
