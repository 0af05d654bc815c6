"""Summaries of repeated measurements, the targets of issue 9, and the one table `make bench`
prints."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: list[float]) -> dict:
    """n, median, p95, p99, min, max, mean and stdev of some samples (NaN when there are none)."""
    values = [float(v) for v in values]
    if not values:
        return {
            "n": 0,
            **{k: math.nan for k in ("median", "p95", "p99", "min", "max", "mean", "stdev")},
        }
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


@dataclass(frozen=True)
class Target:
    """A figure's target from issue 9: `statistic` (median or p99) must be <= `limit`."""

    limit: float
    statistic: str = "median"
    note: str = ""

    def check(self, summary: dict) -> bool | None:
        value = summary.get(self.statistic)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value <= self.limit


TARGETS = {
    "w1_run_ms": Target(12, note="LangGraph + PostgreSQL checkpointer: ~12 ms"),
    "w1_step_ms": Target(4, note="~4 ms per durable step"),
    "w2_run_ms": Target(550, note="ideal 500 ms"),
    "w3_total_s": Target(1.2, note="LangGraph + PostgreSQL: ~1.7 s; ideal 0.6 s"),
    "live_step_ms": Target(50, statistic="p99"),
    "report_costs_ms": Target(300),
    "report_runs_ms": Target(300),
}


@dataclass
class Row:
    key: str
    label: str
    unit: str
    summary: dict
    target: Target | None = None
    error: str = ""

    def as_dict(self) -> dict:
        data = {"label": self.label, "unit": self.unit, **self.summary}
        if self.target is not None:
            data["target"] = {
                "limit": self.target.limit,
                "statistic": self.target.statistic,
                "note": self.target.note,
                "met": self.target.check(self.summary),
            }
        if self.error:
            data["error"] = self.error
        return data


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "MiB" or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """One plain-text table: a row per figure, its spread (min-max), target and verdict."""
    header = [
        "figure",
        "unit",
        "n",
        "median",
        "p95",
        "p99",
        "spread (min-max)",
        "target",
        "verdict",
    ]
    lines = [header]
    for row in rows:
        s = row.summary
        if row.error:
            lines.append(
                [
                    row.label,
                    row.unit,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    _target_text(row),
                    f"ERROR: {row.error[:40]}",
                ]
            )
            continue
        verdict = ""
        if row.target is not None:
            met = row.target.check(s)
            verdict = "-" if met is None else ("PASS" if met else "FAIL")
        lines.append(
            [
                row.label,
                row.unit,
                str(s.get("n", "")),
                _fmt(s.get("median"), row.unit),
                _fmt(s.get("p95"), row.unit),
                _fmt(s.get("p99"), row.unit),
                f"{_fmt(s.get('min'), row.unit)}-{_fmt(s.get('max'), row.unit)}",
                _target_text(row),
                verdict,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for number, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i in (0, 1, 6, 7, 8) else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _target_text(row: Row) -> str:
    if row.target is None:
        return ""
    return f"{row.target.statistic} <= {row.target.limit:g} {row.unit}"
