"""Cost report pages: /costs/ (totals, chart, tables, top runs, anomalies, CSV) and the per-run
breakdown fragment the run page loads.

Charts are server-rendered SVG, not a vendored JavaScript chart library:
- the figures printed on the bars and axes are in the HTML the server sends, so the chart is
  readable without hovering, without JavaScript, in the tests and in a printed page;
- the data is already aggregated per bucket in SQL, so drawing is a little arithmetic on at most
  MAX_BUCKETS bars (`_bar_chart`), cheaper than shipping and pinning a library for two charts;
- escaping stays Django's autoescape, with no client-side templating of names.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from decimal import Decimal

from django import forms
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, QueryDict
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_GET

from runs import costs
from runs.models import ModelPrice, Run
from teams.models import Agent, Workflow

MAX_BUCKETS = 190
DEFAULT_DAYS = 30
EARLIEST = dt.date(2000, 1, 1)
LATEST = dt.date(2100, 12, 31)
TABLE_ROWS = 50
CSV_MAX_ANOMALIES = 100_000


class CostFilterForm(forms.Form):
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    bucket = forms.ChoiceField(
        required=False, choices=[("day", "Day"), ("week", "Week"), ("month", "Month")]
    )
    workflow = forms.ModelChoiceField(
        queryset=Workflow.objects.none(),
        required=False,
        to_field_name="slug",
        empty_label="All workflows",
    )
    agent = forms.ModelChoiceField(
        queryset=Agent.objects.order_by("name"),
        required=False,
        to_field_name="name",
        empty_label="All agents",
    )
    model = forms.CharField(
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"list": "cost-models", "placeholder": "All models"}),
    )
    user = forms.ModelChoiceField(
        queryset=get_user_model().objects.none(),
        required=False,
        to_field_name="username",
        empty_label="All users",
    )

    def __init__(self, data, *, user):
        super().__init__(data)
        workflows = Workflow.objects.for_user(user)
        self.fields["workflow"].queryset = workflows.order_by("name")
        people = get_user_model().objects.order_by("username")
        if not user.is_staff:
            # Only people whose usage this user can see: members and owners of their workflows.
            visible = Workflow.objects.for_user(user).values("pk")
            people = people.filter(
                Q(pk=user.pk) | Q(owned_workflows__in=visible) | Q(workflows__in=visible)
            ).distinct()
        self.fields["user"].queryset = people

    def clean(self) -> dict:
        data = super().clean()
        today = timezone.now().astimezone(dt.UTC).date()
        end = data.get("end") or today
        # 0001-01-01 minus 29 days overflows; such an end is refused just below anyway.
        start = data.get("start") or (
            end - dt.timedelta(days=DEFAULT_DAYS - 1) if end >= EARLIEST else end
        )
        bucket = data.get("bucket") or "day"
        if "start" in self.errors or "end" in self.errors:
            return data
        for name, value in (("start", start), ("end", end)):
            if not EARLIEST <= value <= LATEST:
                self.add_error(name, f"Pick a date between {EARLIEST} and {LATEST}.")
        if self.errors:
            return data
        if start > end:
            self.add_error("end", "The end date is before the start date.")
            return data
        count = len(costs.bucket_starts(start, end, bucket))
        if count > MAX_BUCKETS:
            self.add_error(
                "bucket",
                f"That range has {count} {bucket}s; pick a shorter range or a longer bucket "
                f"(at most {MAX_BUCKETS} bars).",
            )
        data.update(start=start, end=end, bucket=bucket)
        return data

    def filters(self) -> costs.ReportFilters:
        data = self.cleaned_data
        return costs.ReportFilters(
            start=data["start"],
            end=data["end"],
            bucket=data["bucket"],
            workflow=data.get("workflow"),
            agent=data.get("agent"),
            model=(data.get("model") or "").strip(),
            user=data.get("user"),
        )


# --- views ------------------------------------------------------------------------------------


@require_GET
def cost_report(request: HttpRequest) -> HttpResponse:
    params = _with_default_dates(request.GET)
    form = CostFilterForm(params, user=request.user)
    wants_csv = params.get("format") == "csv"
    if not form.is_valid():
        if wants_csv:
            problems = "; ".join(
                f"{name}: {' '.join(errors)}" for name, errors in form.errors.items()
            )
            return HttpResponseBadRequest(
                f"Invalid filters: {problems}\n", content_type="text/plain"
            )
        return render(
            request,
            "costs/report.html",
            {
                "form": form,
                "report": None,
                "models": _model_choices(),
                "warnings": costs.warnings_for_user(request.user),
            },
            status=400,
        )

    filters = form.filters()
    if wants_csv:
        return _csv_response(request.user, filters, params.get("table", ""))

    report = costs.build_report(request.user, filters, table_limit=TABLE_ROWS)
    total = report["totals"]["spent"]
    tables = []
    for name, grouping in costs.GROUPINGS.items():
        rows = report["tables"][name]
        for row in rows:
            row["share_pct"] = _share(row["spent"], total)
            row["drill_url"] = (
                "?" + _query(params, **{grouping.filter_param: row["filter_value"]})
                if row["filter_value"]
                else ""
            )
        tables.append(
            {
                "name": name,
                "title": grouping.title,
                "rows": rows[:TABLE_ROWS],
                "more": len(rows) > TABLE_ROWS,
                "csv_url": "?" + _csv_query(params, name),
            }
        )
    return render(
        request,
        "costs/report.html",
        {
            "form": form,
            "filters": filters,
            "report": report,
            "tables": tables,
            "money_chart": _money_chart(report["series"], filters.bucket),
            "token_chart": _token_chart(report["series"], filters.bucket),
            "csv": {
                name: "?" + _csv_query(params, name)
                for name in ("totals", "series", "top_runs", "anomalies")
            },
            "models": _model_choices(),
            "warnings": costs.warnings_for_user(request.user),
            "anomaly_factor": costs.ANOMALY_FACTOR,
        },
    )


@require_GET
def run_breakdown(request: HttpRequest, run_id: int) -> HttpResponse:
    """The per-run fragment alone, for the run page to load or refresh with htmx."""
    run = get_object_or_404(Run.objects.for_user(request.user), pk=run_id)
    return render(request, "costs/_run_breakdown.html", {"breakdown": costs.run_breakdown(run)})


# --- helpers ----------------------------------------------------------------------------------


def _with_default_dates(params: QueryDict) -> QueryDict:
    """The request's filters with the default range written in, so the form shows the dates
    the report covers and every link (CSV, drill-down) names them explicitly."""
    data = params.copy()
    if not data.get("end"):
        data["end"] = timezone.now().astimezone(dt.UTC).date().isoformat()
    if not data.get("start"):
        try:
            end = dt.date.fromisoformat(data["end"])
            data["start"] = (end - dt.timedelta(days=DEFAULT_DAYS - 1)).isoformat()
        except (ValueError, OverflowError):
            pass  # the form reports the bad end date
    if not data.get("bucket"):
        data["bucket"] = "day"
    return data


def _share(part: Decimal, whole: Decimal) -> Decimal | None:
    return (part * 100 / whole).quantize(Decimal("0.1")) if whole else None


def _query(params: QueryDict, **changes) -> str:
    query = params.copy()
    for name in ("format", "table"):
        query.pop(name, None)
    for name, value in changes.items():
        query[name] = value
    return query.urlencode()


def _csv_query(params: QueryDict, table: str) -> str:
    return _query(params, format="csv", table=table)


def _model_choices() -> list[str]:
    """Suggestions for the model filter: priced models and the agents' models (small tables;
    a DISTINCT over the usage table would scan it)."""
    names = set(ModelPrice.objects.values_list("model", flat=True).distinct())
    names.update(Agent.objects.values_list("model", flat=True).distinct())
    return sorted(names)


# --- CSV --------------------------------------------------------------------------------------

CSV_TABLES = ("totals", "series", *costs.GROUPINGS, "top_runs", "anomalies")
FIGURE_HEADERS = [
    "cost_usd",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "calls",
]


def _figures(row: dict) -> list:
    return [
        row["spent"],
        row["prompt"],
        row["completion"],
        row["cached"],
        row["tokens"],
        row["calls"],
    ]


def _cell(value):
    # Names are user-controlled: a leading = + - @ would run as a formula in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _run_cells(row: dict) -> list:
    run = row["run"]
    return [
        row["run_id"],
        run.workflow.slug if run else "",
        run.started_by.username if run and run.started_by else "",
        run.status if run else "",
        run.created_at.isoformat() if run else "",
    ]


def _csv_response(user, filters: costs.ReportFilters, table: str) -> HttpResponse:
    if table not in CSV_TABLES:
        return HttpResponseBadRequest(
            f"Unknown table {table!r}: choose one of {', '.join(CSV_TABLES)}.\n",
            content_type="text/plain",
        )
    daily = costs.filtered_daily_usage(user, filters)
    if table in ("totals", "series"):
        series = costs.time_series(daily, filters)
        if table == "totals":
            header = ["from", "to", *FIGURE_HEADERS]
            rows = [[filters.start, filters.end, *_figures(costs.totals_of(series))]]
        else:
            header = [f"{filters.bucket}_start", *FIGURE_HEADERS]
            rows = [[row["bucket"], *_figures(row)] for row in series]
    elif table in costs.GROUPINGS:
        grouping = costs.GROUPINGS[table]
        header = [grouping.title.lower(), *FIGURE_HEADERS]
        rows = [[row["label"], *_figures(row)] for row in costs.grouped(daily, grouping)]
    else:
        found = costs.expensive_runs(user, filters, max_anomalies=CSV_MAX_ANOMALIES)
        header = [
            "run_id",
            "workflow",
            "started_by",
            "status",
            "created_at",
            *FIGURE_HEADERS,
            "workflow_median_usd",
            "times_median",
        ]
        rows = [
            [*_run_cells(row), *_figures(row), row["median"], row["ratio"]]
            for row in found["top" if table == "top_runs" else "anomalies"]
        ]
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="baton-costs-{table}-{filters.start}-{filters.end}.csv"'
    )
    writer = csv.writer(response)
    writer.writerow(header)
    writer.writerows([[_cell(value) for value in row] for row in rows])
    return response


# --- charts -----------------------------------------------------------------------------------

CHART_W, CHART_H = 960, 320
PAD_LEFT, PAD_RIGHT, PAD_BOTTOM = 76, 12, 40


def _nice_ceiling(value: float, ticks: int = 4) -> tuple[float, float]:
    """(axis top, tick step): a 1-2-5 step so the tick labels are round numbers."""
    if value <= 0:
        return 1.0, 0.25
    raw = value / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        step = factor * magnitude
        if step * ticks >= value:
            return step * ticks, step
    return 10 * magnitude * ticks, 10 * magnitude


def _compact_money(value: float) -> str:
    if value == 0:
        return "$0"
    if value >= 1_000_000:
        return f"${value / 1_000_000:.1f}M"
    if value >= 1000:
        return f"${value / 1000:.1f}k"
    if value >= 1:
        return f"${value:.2f}"
    return costs.money(Decimal(str(value)))


def _compact_count(value: float) -> str:
    if value >= 1_000_000_000:
        return f"{value / 1_000_000_000:.1f}B"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def _bucket_label(start: dt.date, bucket: str) -> str:
    if bucket == "month":
        return start.strftime("%b %Y")
    return start.strftime("%b %d")


def _bar_chart(
    labels: list[str], stacks: list[list[float]], fmt, *, title: str, series: list[str], axis: str
) -> dict:
    """Geometry of a (stacked) bar chart: bars with their value printed above, y ticks with
    round values, and as many x labels as fit. The template only draws what this returns."""
    count = len(stacks)
    totals = [sum(stack) for stack in stacks]
    plot_w = CHART_W - PAD_LEFT - PAD_RIGHT
    slot = plot_w / max(count, 1)
    vertical_values = slot < 46
    pad_top = 64 if vertical_values else 24
    plot_h = CHART_H - pad_top - PAD_BOTTOM
    top, step = _nice_ceiling(max(totals, default=0))
    scale = plot_h / top
    base_y = pad_top + plot_h
    label_every = max(1, math.ceil(count / (plot_w / 64)))
    bars = []
    for index, (label, stack, total) in enumerate(zip(labels, stacks, totals, strict=True)):
        x = PAD_LEFT + index * slot + slot * 0.15
        width = max(slot * 0.7, 1)
        segments, y = [], base_y
        for part, value in enumerate(stack):
            height = value * scale
            y -= height
            if height > 0:
                segments.append(
                    {
                        "x": round(x, 1),
                        "y": round(y, 1),
                        "w": round(width, 1),
                        "h": round(height, 1),
                        "part": part,
                        "title": f"{series[part]}: {fmt(value)}",
                    }
                )
        center = round(x + width / 2, 1)
        bars.append(
            {
                "segments": segments,
                "center": center,
                "value": fmt(total) if total else "",
                "value_y": round(base_y - total * scale - 4, 1),
                "label": label if index % label_every == 0 else "",
                "full_label": label,
            }
        )
    ticks = []
    value = 0.0
    while value <= top + step / 1000:
        ticks.append({"y": round(base_y - value * scale, 1), "text": fmt(value)})
        value += step
    return {
        "width": CHART_W,
        "height": CHART_H,
        "title": title,
        "axis": axis,
        "bars": bars,
        "ticks": ticks,
        "vertical_values": vertical_values,
        "left": PAD_LEFT,
        "right": CHART_W - PAD_RIGHT,
        "base_y": base_y,
        "top_y": pad_top,
        "tick_x": PAD_LEFT - 6,
        "mid_x": PAD_LEFT + plot_w / 2,
        "label_y": base_y + 18,
        "axis_mid_y": pad_top + plot_h / 2,
        "series": series if len(series) > 1 else [],
        "empty": not any(totals),
    }


def _money_chart(series: list[dict], bucket: str) -> dict:
    return _bar_chart(
        [_bucket_label(row["bucket"], bucket) for row in series],
        [[float(row["spent"])] for row in series],
        _compact_money,
        title=f"Cost per {bucket} (USD)",
        series=["Cost"],
        axis="USD",
    )


def _token_chart(series: list[dict], bucket: str) -> dict:
    stacks = [
        [max(row["prompt"] - row["cached"], 0), row["cached"], row["completion"]] for row in series
    ]
    return _bar_chart(
        [_bucket_label(row["bucket"], bucket) for row in series],
        stacks,
        _compact_count,
        title=f"Tokens per {bucket}",
        axis="tokens",
        series=["Prompt (not cached)", "Prompt (cached)", "Completion"],
    )
