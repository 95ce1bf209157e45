"""SVG pictures of what the cache did: latency distributions and hit ratio over time.

Used by ``sqla-cachelayer demo --plots DIR`` and by
``benchmarks/query_cache.py --plots DIR``. Drawn with matplotlib, which is an
optional extra (``pip install "sqla_cachelayer[plots]"``), imported only
here and only when a picture is asked for. The SVG files are reproducible: no
date in their metadata and fixed element ids, so a file that did not change
does not show up as changed in version control.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PlotsUnavailable", "hit_ratio_over_time", "latency_distributions"]

#: outcome -> colour (colour-blind safe, from the Okabe-Ito palette)
COLOURS = {"uncached": "#555555", "hit": "#009E73", "miss": "#D55E00"}


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed (the ``plots`` extra)."""


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as err:
        raise PlotsUnavailable(
            'drawing plots needs matplotlib: pip install "sqla_cachelayer[plots]"'
        ) from err
    matplotlib.use("Agg")  # no display needed; SVG is written by its own backend
    matplotlib.rcParams.update(
        {
            "svg.hashsalt": "sqla_cachelayer",  # stable ids: reproducible files
            "svg.fonttype": "none",  # text stays text: small, searchable files
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return importlib.import_module("matplotlib.pyplot")


def _save(figure: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    importlib.import_module("matplotlib.pyplot").close(figure)
    return path


def latency_distributions(
    panels: Mapping[str, Mapping[str, Sequence[int]]], path: str, title: str
) -> str:
    """Histograms of latency per outcome, one panel per query.

    :param panels: query title -> outcome (``uncached``, ``hit``, ``miss``) ->
        latencies in nanoseconds.
    :param path: the SVG file to write; returned.
    """
    plt = _pyplot()
    shown = {name: data for name, data in panels.items() if any(data.values())}
    columns = min(2, max(1, len(shown)))
    rows = math.ceil(len(shown) / columns) if shown else 1
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, (name, data) in zip(axes.flat, shown.items(), strict=False):
        values = [v / 1000 for samples in data.values() for v in samples if v > 0]
        low, high = min(values), max(values)
        if high <= low:
            high = low * 1.01
        edges = [low * (high / low) ** (i / 40) for i in range(41)]  # log-spaced bins
        for outcome, samples in data.items():
            if not samples:
                continue
            us = sorted(v / 1000 for v in samples)
            median = us[len(us) // 2]
            ax.hist(
                us,
                bins=edges,
                histtype="step",
                linewidth=1.4,
                color=COLOURS.get(outcome),
                label=f"{outcome} (median {median:,.0f} µs, n={len(us):,})",
            )
            ax.axvline(median, color=COLOURS.get(outcome), linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlabel("latency per query (µs, log scale)")
        ax.set_ylabel("queries")
        ax.legend(fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=10, x=0.01, ha="left")
    figure.tight_layout()
    return _save(figure, path)


def hit_ratio_over_time(
    outcomes: Sequence[str], writes: Sequence[int], path: str, title: str, window: int = 100
) -> str:
    """The hit ratio of the cached reads over a workload, with its writes marked.

    :param outcomes: per operation, in order: ``hit``, ``miss`` or ``other``
        for a cached read, or ``write``.
    :param writes: the operation indexes of the writes (ticks under the curve).
    :param window: reads per point of the moving ratio.
    """
    plt = _pyplot()
    reads = [(i, o == "hit") for i, o in enumerate(outcomes) if o != "write"]
    figure, ax = plt.subplots(figsize=(9.2, 2.8))
    xs: list[int] = []
    ys: list[float] = []
    hits_in_window = 0
    for n, (op, hit) in enumerate(reads):
        hits_in_window += hit
        if n >= window:
            hits_in_window -= reads[n - window][1]
        if n + 1 >= min(window, len(reads)):
            xs.append(op)
            ys.append(100.0 * hits_in_window / min(window, n + 1))
    total = sum(hit for _, hit in reads)
    ax.plot(xs, ys, color=COLOURS["hit"], linewidth=1.2, label=f"hit ratio, last {window} reads")
    if reads:
        ax.axhline(
            100.0 * total / len(reads),
            color=COLOURS["hit"],
            linewidth=0.8,
            linestyle=":",
            label=f"whole run: {100.0 * total / len(reads):.1f}%",
        )
    ax.plot(
        list(writes),
        [-3.0] * len(writes),
        linestyle="none",
        marker="|",
        markersize=6,
        color=COLOURS["miss"],
        label=f"writes ({len(writes):,})",
    )
    ax.set_ylim(-6, 100)
    ax.set_xlim(0, max(1, len(outcomes)))
    ax.set_xlabel("operation")
    ax.set_ylabel("hit ratio (%)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(fontsize=7, frameon=False, loc="upper right", ncols=3)
    figure.tight_layout()
    return _save(figure, path)
