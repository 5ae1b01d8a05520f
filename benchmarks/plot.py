"""The failover results of benchmark 1 as a PNG (matplotlib, Agg backend).

Reads ``results/failover[-quick].json`` and writes ``results/failover[-quick].png``. Left: per
scenario, the p50 latency of each policy and the one iscsi-ls loop (hatched when a try was
killed at the cap) on a log scale, with open-iscsi's stated timing as hollow markers (a figure
from iscsid.conf, not a measurement). Right: the p95 (bar) and p50 (tick) overhead over the
ideal per policy, against the goal.

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


def _bar_labels(axes: Any, bars: Any, values: list[float], texts: list[str]) -> None:
    for bar, value, text in zip(bars, values, texts, strict=True):
        axes.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, value),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=90,
        )


def plot_failover(payload: dict[str, Any], path: Path) -> Path:
    """Draw ``payload`` (benchmark 1's JSON) into ``path``: latency left, overhead right."""
    plt = _pyplot()
    scenarios = payload["scenarios"]
    settings = payload["settings"]
    policies = [m for m in _COLOURS if m in scenarios[0]["methods"]]
    loops = [s.get("iscsi_ls_loop") for s in scenarios]
    methods = policies + (["iscsi-ls"] if any(loops) else [])
    figure, (latency, overhead) = plt.subplots(
        1, 2, figsize=(15, 7), dpi=110, gridspec_kw={"width_ratios": [3, 2]}
    )

    width = 0.8 / len(methods)
    for offset, method in enumerate(methods):
        xs = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(scenarios))]
        if method == "iscsi-ls":
            values = [loop["wall_s"] if loop else 0.0 for loop in loops]
            texts = [
                ("killed " if loop and loop["capped"] else "") + _label(v) if loop else ""
                for loop, v in zip(loops, values, strict=True)
            ]
            name = "iscsi-ls loop (libiscsi, no timeouts; once per scenario)"
            hatch = ["//" if loop and loop["capped"] else "" for loop in loops]
        else:
            values = [s["methods"][method]["wall_s"]["p50"] for s in scenarios]
            texts = [_label(v) for v in values]
            name = f"{method} (p50)"
            hatch = [""] * len(values)
        bars = latency.bar(xs, values, width * 0.95, label=name, color=_COLOURS[method])
        for bar, pattern in zip(bars, hatch, strict=True):
            bar.set_hatch(pattern)
        _bar_labels(latency, bars, values, texts)
    stated = [(i, s["open_iscsi_stated_s"]) for i, s in enumerate(scenarios)]
    shown = [(i, v) for i, v in stated if v]
    if shown:
        latency.scatter(
            [i for i, _ in shown],
            [v for _, v in shown],
            marker="D",
            facecolors="none",
            edgecolors="black",
            label="open-iscsi, iscsid.conf defaults (stated, not measured)",
            zorder=3,
        )
    latency.set_yscale("log")
    latency.set_ylabel("time until probe() returns, or the iscsi-ls loop ends (log scale)")
    latency.set_xticks(range(len(scenarios)))
    latency.set_xticklabels([s["key"] for s in scenarios], rotation=20)
    latency.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _pos: _tick(value)))
    latency.grid(axis="y", which="major", alpha=0.3)
    latency.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    latency.set_title("latency", fontsize=10)

    width = 0.8 / len(policies)
    for offset, method in enumerate(policies):
        xs = [i + (offset - (len(policies) - 1) / 2) * width for i in range(len(scenarios))]
        stats = [s["methods"][method]["overhead_s"] for s in scenarios]
        p95 = [x["p95"] * 1000 if x else 0.0 for x in stats]
        p50 = [x["p50"] * 1000 if x else 0.0 for x in stats]
        bars = overhead.bar(xs, p95, width * 0.95, label=f"{method} p95", color=_COLOURS[method])
        overhead.scatter(xs, p50, marker="_", color="black", zorder=3)
        _bar_labels(overhead, bars, p95, [f"{v:.1f}" for v in p95])
    goal = payload["goals"][0]["limit_s"] * 1000
    overhead.axhline(goal, color="black", linestyle="--", linewidth=1, label=f"goal {goal:g} ms")
    overhead.set_ylabel("wall - ideal, ms (bar: p95, tick: p50)")
    overhead.set_xticks(range(len(scenarios)))
    overhead.set_xticklabels([s["key"] for s in scenarios], rotation=20)
    overhead.grid(axis="y", alpha=0.3)
    overhead.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    overhead.set_title("overhead over the ideal", fontsize=10)

    machine = payload["machine"]
    figure.suptitle(
        f"pyiscsi-failover: failover on loopback ({payload['mode']} run, {settings['runs']} runs; "
        f"connect {settings['connect_timeout_s']:g} s, login {settings['login_timeout_s']:g} s, "
        f"stagger {settings['stagger_s']:g} s; iscsi-ls cap {settings['iscsi_ls_cap_s']:g} s, "
        f"hatched = killed at the cap)\n{machine['cpu_model']}, {machine['usable_cpus']} CPUs, "
        f"{machine['python']}",
        fontsize=10,
    )
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
