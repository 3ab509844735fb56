"""Tables on stdout, JSON and PNG files under the run's results folder, target verdicts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Target:
    """One target of the issue, checked against a figure measured in this run."""

    name: str
    goal: str
    measured: float | None
    unit: str
    met: bool | None  # None: could not be measured in this run (say why in `note`)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check(
    name: str,
    goal: str,
    measured: float | None,
    unit: str,
    limit: float,
    higher_is_better: bool,
    note: str = "",
) -> Target:
    if measured is None or math.isnan(measured):
        return Target(name, goal, None, unit, None, note or "not measured")
    met = measured >= limit if higher_is_better else measured <= limit
    how = f"{measured / limit:.2f}x the limit" if limit else ""
    text = "; ".join(part for part in (how, note) if part)
    return Target(name, goal, round(measured, 3), unit, met, text)


def percentiles_ms(values_ns: Sequence[int]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max of latencies given in ns, in ms (None when there are none)."""
    if not values_ns:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None}
    ordered = sorted(values_ns)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return round(ordered[min(last, math.ceil(q * len(ordered)) - 1)] / 1e6, 3)

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] / 1e6, 3),
    }


def us_each(seconds: float | None, count: float) -> float | None:
    """`seconds` (of CPU, or of wall time) per one of `count` operations, in us; None when not
    measured (a process that is not local) or when nothing was done."""
    return round(seconds / count * 1e6, 2) if seconds is not None and count else None


def cores(cpu: float | None, wall: float) -> float | None:
    """CPU seconds over a window of `wall` s as a fraction of one core; None: not measured."""
    return round(cpu / wall, 3) if cpu is not None else None


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[fmt(v) for v in row] for row in rows]
    text = [bool(rows) and all(isinstance(r[i], str) for r in rows) for i in range(len(columns))]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    line = "  ".join("-" * w for w in widths)

    def join(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if left else v.rjust(w)
            for v, w, left in zip(values, widths, text, strict=True)
        ).rstrip()

    out = [title, line, join(columns), line, *(join(r) for r in cells), line]
    return "\n".join(out)


def targets_table(targets: Sequence[Target]) -> str:
    rows = [
        [
            t.name,
            t.goal,
            t.measured,
            t.unit,
            "n/a" if t.met is None else ("met" if t.met else "MISSED"),
            t.note,
        ]
        for t in targets
    ]
    return table("Targets", ["target", "goal", "measured", "unit", "verdict", "note"], rows)


def write_json(folder: Path, name: str, data: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Target):
        return value.to_json()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None if the bench extra is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(path: Path, title: str, series: Mapping[str, Sequence[int]]) -> Path | None:
    """Latency CDFs (values in ns), one line per series, log-scaled latency axis."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, values in series.items():
        if not values:
            continue
        ordered = sorted(values)
        step = max(1, len(ordered) // 2000)  # a CDF needs no more points than pixels
        xs = [v / 1e6 for v in ordered[::step]] + [ordered[-1] / 1e6]
        ys = [i * step / len(ordered) for i in range(len(xs) - 1)] + [1.0]
        ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("publish -> receive latency (ms, log scale)")
    ax.set_ylabel("fraction of deliveries")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lines(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    second: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    second_label: str = "",
) -> Path | None:
    """Lines of (x, y) points; `second` goes on a right-hand axis (dashed)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if second:
        right = ax.twinx()
        for label, points in second.items():
            right.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="x",
                linestyle="--",
                label=label,
            )
        right.set_ylabel(second_label)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
