"""Benchmark 4: the failover latencies of benchmark 1 as a PNG (matplotlib, Agg backend).

Reads ``results/failover[-quick].json`` and writes ``results/failover[-quick].png``: one group of
bars per scenario (sequential, ordered, staggered, the iscsi-ls loop) on a log scale, with
open-iscsi's stated timing as hollow markers (a figure from iscsid.conf, not a measurement).

matplotlib is loaded with importlib and used untyped: it is only installed by ``nox -s bench``,
and the type-check session must pass without it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Final

from benchmarks.common import results_path

__all__ = ["plot_failover", "run"]

_COLOURS: Final = {
    "sequential": "#4C72B0",
    "ordered": "#55A868",
    "staggered": "#C44E52",
    "iscsi-ls": "#8C8C8C",
}


def _pyplot() -> Any:
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display: render to files only
    return importlib.import_module("matplotlib.pyplot")


def _label(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _tick(seconds: float) -> str:
    if seconds <= 0:
        return ""
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def plot_failover(payload: dict[str, Any], path: Path) -> Path:
    """Draw ``payload`` (benchmark 1's JSON) into ``path``."""
    plt = _pyplot()
    scenarios = payload["scenarios"]
    settings = payload["settings"]
    methods = [m for m in _COLOURS if m in scenarios[0]["methods"]]
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(figsize=(13, 7), dpi=110)
    for offset, method in enumerate(methods):
        xs = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(scenarios))]
        medians = [s["methods"][method]["latency_s"]["median"] for s in scenarios]
        name = method if method != "iscsi-ls" else "iscsi-ls loop (libiscsi, capped)"
        bars = axes.bar(xs, medians, width * 0.95, label=name, color=_COLOURS[method])
        for bar, value in zip(bars, medians, strict=True):
            axes.annotate(
                _label(value),
                (bar.get_x() + bar.get_width() / 2, value),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
            )
    stated = [(i, s["open_iscsi_stated_s"]) for i, s in enumerate(scenarios)]
    shown = [(i, v) for i, v in stated if v > 0]
    if shown:
        axes.scatter(
            [i for i, _ in shown],
            [v for _, v in shown],
            marker="D",
            facecolors="none",
            edgecolors="black",
            label="open-iscsi, iscsid.conf defaults (stated, not measured)",
            zorder=3,
        )
        for i, value in shown:
            axes.annotate(
                f"{value:g} s", (i, value), xytext=(7, -3), textcoords="offset points", fontsize=7
            )
    axes.set_yscale("log")
    axes.set_ylabel("time until probe() returns, or the iscsi-ls loop ends (log scale)")
    axes.set_xticks(range(len(scenarios)))
    axes.set_xticklabels([s["label"] for s in scenarios])
    axes.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _pos: _tick(value)))
    axes.grid(axis="y", which="major", alpha=0.3)
    machine = payload["machine"]
    axes.set_title(
        f"pyiscsi-failover: failover latency on loopback ({payload['mode']} run: connect "
        f"{settings['connect_timeout_s']:g} s, login {settings['login_timeout_s']:g} s, stagger "
        f"{settings['stagger_s']:g} s, iscsi-ls cap {settings['iscsi_ls_cap_s']:g} s; median of "
        f"{settings['repetitions']})\n{machine['cpu_model']}, {machine['usable_cpus']} CPUs, "
        f"{machine['python']}",
        fontsize=10,
    )
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Plot the failover results of this mode (full or quick) if they exist."""
    del reps  # nothing is measured here
    source = results_path("failover", quick=quick)
    if not source.exists():
        print(f"  no {source.name}: run the failover benchmark first")
        return {"written": None}
    payload = json.loads(source.read_text(encoding="utf-8"))
    path = plot_failover(payload, results_path("failover", quick=quick, suffix=".png"))
    print(f"\nwritten: {path}")
    return {"written": str(path)}
