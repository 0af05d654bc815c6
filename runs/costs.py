"""What LLM calls cost: report queries, the per-run breakdown, workflow / global spend caps, and
the daily rollup of usage that the reports and caps read.

Every figure is aggregated in SQL (GROUP BY, window functions, `percentile_cont` on PostgreSQL);
Python only loops over the aggregated groups, never over usage rows. The pages live in
`runs/cost_views.py`.

Money is US dollars (LiteLLM's price map is in dollars). "Cached" tokens are the part of the
prompt that the provider served from its prompt cache, so they are counted inside `prompt`.

Totals, the chart and the grouped tables sum `UsageDaily` rows (one per UTC day, workflow,
agent, model and user), kept equal to the `UsageRecord` sums in the same transactions that
change the records (see "daily rollup" below). Report days are UTC days, so a day is one rollup
row per key and never a part of one. Top runs and anomalies use the totals on `Run`; the
per-run breakdown reads that run's records.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.mail import mail_admins, send_mail
from django.db import connection, transaction
from django.db.models import (
    Count,
    DateField,
    F,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.functions import Coalesce, TruncMonth, TruncWeek
from django.utils import timezone

from runs import rows
from runs.models import Run, Step, UsageDaily, UsageRecord
from teams.models import Agent, Workflow

log = logging.getLogger(__name__)

ZERO = Decimal(0)
CENT_PLACES = Decimal("0.00000001")  # the precision of UsageRecord.cost
ANOMALY_FACTOR = 3
WARN_SHARE = Decimal("0.8")
TOP_RUNS = 20
MAX_ANOMALIES = 50


# --- formatting -------------------------------------------------------------------------------


def as_decimal(value) -> Decimal:
    """Normalise a summed cost (Decimal on PostgreSQL, float from raw SQLite SQL, or None)."""
    if value is None:
        return ZERO
    if not isinstance(value, Decimal):
        value = Decimal(str(value))
    return value.quantize(CENT_PLACES)


def money(value) -> str:
    """$1,234.50 for large amounts; small ones keep two significant digits ($0.00042)."""
    value = as_decimal(value)
    if value == 0:
        return "$0.00"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= Decimal("0.01"):
        return f"{sign}${value:,.2f}"
    places = min(8, -value.adjusted() + 1)
    text = f"{value:.{places}f}".rstrip("0")
    return f"{sign}${text}"


# --- scope and filters ------------------------------------------------------------------------


def daily_usage_for_user(user) -> QuerySet:
    """The rollup rows `user` may see: the same rule as `Run.objects.for_user`.

    Staff see everything. Others see usage of workflows they own or are a member of, plus usage of
    runs they started. A rollup row has no run, but its `user` is the starter of the runs it sums
    (the engine records `run.started_by` on every call, and both become NULL together if the user
    is deleted), so "runs they started" is `user = them`.
    """
    rows = UsageDaily.objects.all()
    if not user.is_authenticated:
        return rows.none()
    if user.is_staff:
        return rows
    workflows = Workflow.objects.filter(Q(owner=user) | Q(members=user)).values("pk")
    return rows.filter(Q(workflow_id__in=workflows) | Q(user=user))


@dataclass(frozen=True)
class ReportFilters:
    """A validated report request (built by the filter form). `end` is inclusive; days are UTC."""

    start: dt.date
    end: dt.date
    bucket: str = "day"
    workflow: Workflow | None = None
    agent: Agent | None = None
    model: str = ""
    user: object | None = None

    @property
    def since(self) -> dt.datetime:
        return dt.datetime.combine(self.start, dt.time.min, tzinfo=dt.UTC)

    @property
    def until(self) -> dt.datetime:
        return dt.datetime.combine(self.end + dt.timedelta(days=1), dt.time.min, tzinfo=dt.UTC)


def bucket_starts(start: dt.date, end: dt.date, bucket: str) -> list[dt.date]:
    """The first day of every bucket that overlaps [start, end]; weeks start on Monday (ISO),
    as PostgreSQL's and Django's week truncation do."""
    if bucket == "day":
        first, starts = start, []
    elif bucket == "week":
        first, starts = start - dt.timedelta(days=start.weekday()), []
    else:
        first, starts = start.replace(day=1), []
    current = first
    while current <= end:
        starts.append(current)
        if bucket == "day":
            current += dt.timedelta(days=1)
        elif bucket == "week":
            current += dt.timedelta(days=7)
        else:
            current = (current.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return starts


def filtered_daily_usage(user, filters: ReportFilters) -> QuerySet:
    """The rollup rows of the report: visible to `user`, in the range, narrowed by the filters."""
    rows = daily_usage_for_user(user).filter(day__gte=filters.start, day__lte=filters.end)
    if filters.workflow is not None:
        rows = rows.filter(workflow=filters.workflow)
    if filters.agent is not None:
        rows = rows.filter(agent=filters.agent)
    if filters.model:
        rows = rows.filter(model=filters.model)
    if filters.user is not None:
        rows = rows.filter(user=filters.user)
    return rows


# --- report tables ----------------------------------------------------------------------------

# Aggregate names must not clash with the models' own fields (cost, prompt_tokens...).
FIGURES = ("spent", "prompt", "completion", "cached", "tokens", "calls")


def _sums() -> dict:
    """The figures of a group of UsageRecord rows (one row per call)."""
    return {
        "spent": Sum("cost"),
        "prompt": Sum("prompt_tokens"),
        "completion": Sum("completion_tokens"),
        "cached": Sum("cached_tokens"),
        "tokens": Sum("total_tokens"),
        "calls": Count("*"),
    }


def _daily_sums() -> dict:
    """The same figures from UsageDaily rows (one row per day and key, `call_count` calls)."""
    return {**_sums(), "calls": Sum("call_count")}


def _clean_figures(row: dict) -> dict:
    row["spent"] = as_decimal(row.get("spent"))
    for name in ("prompt", "completion", "cached", "tokens", "calls"):
        row[name] = int(row.get(name) or 0)
    row["cost_text"] = money(row["spent"])
    return row


def empty_figures() -> dict:
    return {
        "spent": ZERO,
        "prompt": 0,
        "completion": 0,
        "cached": 0,
        "tokens": 0,
        "calls": 0,
        "cost_text": money(ZERO),
    }


def _add_figures(total: dict, row: dict) -> None:
    for name in FIGURES:
        total[name] += row[name]
    total["cost_text"] = money(total["spent"])


def _bucket_of_day(bucket: str):
    if bucket == "day":
        return F("day")
    trunc = TruncWeek if bucket == "week" else TruncMonth
    return trunc("day", output_field=DateField())


def time_series(daily: QuerySet, filters: ReportFilters) -> list[dict]:
    """One row per bucket in the range, empty buckets included (so the chart's x axis is
    honest). The database groups the rollup rows of `filtered_daily_usage`; the gap filling
    loops over buckets only."""
    rows = (
        daily.order_by()
        .annotate(bucket=_bucket_of_day(filters.bucket))
        .values("bucket")
        .annotate(**_daily_sums())
    )
    by_start = {}
    for row in rows:
        bucket = row.pop("bucket")
        day = bucket.date() if isinstance(bucket, dt.datetime) else bucket
        by_start[day] = _clean_figures(row)
    return [
        {"bucket": start, **by_start.get(start, empty_figures())}
        for start in bucket_starts(filters.start, filters.end, filters.bucket)
    ]


def totals_of(series: list[dict]) -> dict:
    """The totals of a report are the sum of its buckets: no second scan of the records."""
    totals = empty_figures()
    for row in series:
        _add_figures(totals, row)
    return totals


@dataclass(frozen=True)
class Grouping:
    name: str
    title: str
    column: str  # UsageDaily column grouped on
    filter_param: str  # the report filter that narrows to one group


GROUPINGS = {
    "by_workflow": Grouping("by_workflow", "Workflow", "workflow_id", "workflow"),
    "by_agent": Grouping("by_agent", "Agent", "agent_id", "agent"),
    "by_model": Grouping("by_model", "Model", "model", "model"),
    "by_user": Grouping("by_user", "User", "user_id", "user"),
}


def _labels(grouping: Grouping, keys: list) -> dict:
    """{key: (label, filter value)} for the groups shown: one query per table, not per row."""
    ids = [key for key in keys if key is not None]
    if grouping.name == "by_workflow":
        found = Workflow.objects.filter(pk__in=ids).values_list("pk", "name", "slug")
        labels = {pk: (name, slug) for pk, name, slug in found}
        missing = "(no workflow)"
    elif grouping.name == "by_agent":
        labels = {
            pk: (name, name)
            for pk, name in Agent.objects.filter(pk__in=ids).values_list("pk", "name")
        }
        missing = "(no agent)"
    elif grouping.name == "by_user":
        users = get_user_model().objects.filter(pk__in=ids)
        labels = {pk: (name, name) for pk, name in users.values_list("pk", "username")}
        missing = "(no user)"
    else:
        labels = {key: (key, key) for key in ids}
        missing = "(no model)"
    return {key: labels.get(key, (missing, "")) for key in keys}


def grouped(daily: QuerySet, grouping: Grouping, limit: int | None = None) -> list[dict]:
    """Figures per workflow / agent / model / user from rollup rows, most expensive first."""
    rows = (
        daily.order_by()
        .values(grouping.column)
        .annotate(**_daily_sums())
        .order_by("-spent", grouping.column)
    )
    if limit is not None:
        rows = rows[:limit]
    rows = [_clean_figures(row) for row in rows]
    labels = _labels(grouping, [row[grouping.column] for row in rows])
    for row in rows:
        row["key"] = row.pop(grouping.column)
        row["label"], row["filter_value"] = labels[row["key"]]
    return rows


def filtered_runs(user, filters: ReportFilters) -> QuerySet:
    """The runs of the report before its agent and model filters: started in the range, visible
    to `user` (the same rule as `Run.objects.for_user`, written without its member join so no
    DISTINCT is needed), narrowed by the workflow and user filters, and with at least one LLM
    call. `expensive_runs` narrows them to the runs that called the filtered agent or model."""
    runs = Run.objects.filter(created_at__gte=filters.since, created_at__lt=filters.until)
    if not user.is_authenticated:
        return runs.none()
    if not user.is_staff:
        workflows = Workflow.objects.filter(Q(owner=user) | Q(members=user)).values("pk")
        runs = runs.filter(Q(workflow_id__in=workflows) | Q(started_by=user))
    if filters.workflow is not None:
        runs = runs.filter(workflow=filters.workflow)
    if filters.user is not None:
        runs = runs.filter(started_by=filters.user)
    return runs.filter(Q(total_tokens__gt=0) | Q(cost__gt=0))


def _report_runs_sql(runs_sql: str, filters: ReportFilters) -> tuple[str, list]:
    """The `report_runs` CTE of `expensive_runs` (and the params it adds to `runs_sql`'s): the
    runs of `runs_sql` (`filtered_runs`) or, with an agent or model filter, those of them that
    made such a call.

    Those are found on the (agent, run) or (model, run) index of the records, from the
    smallest run id of the range on (ids grow with time), so the scan grows with the calls
    made since then, not with all history. Read in index order, the run ids come sorted and
    their repeats are dropped in one pass. The lower bound is a row comparison on the index's
    two columns, so PostgreSQL plans it as that index's range whether the table is vacuumed
    or not (with a plain `run_id >= ...`, whose value it cannot estimate, it walked the run_id
    index and filtered every call).
    """
    cte_columns = "(run_id, workflow_id, spent, prompt, completion, tokens)"
    keys = []
    if filters.agent is not None:
        keys.append(("agent_id", filters.agent.pk))
    if filters.model:
        keys.append(("model", filters.model))
    if not keys:
        return f"report_runs {cte_columns} AS ({runs_sql})", []
    (column, value), *others = keys
    condition = (
        f"({column}, run_id) >= (%s, (SELECT MIN(run_id) FROM range_runs)) AND {column} = %s"
    )
    params = [value, value]
    for other, other_value in others:
        condition += f" AND {other} = %s"
        params.append(other_value)
    sql = (
        f"range_runs {cte_columns} AS ({runs_sql}), report_runs AS (SELECT * FROM range_runs"
        f" WHERE run_id IN (SELECT DISTINCT run_id FROM {rows.table(UsageRecord)}"
        f" WHERE {condition}))"
    )
    return sql, params


def _medians_sql() -> str:
    """Per-workflow median of the run costs and the anomaly threshold (ANOMALY_FACTOR x median),
    in SQL. PostgreSQL has percentile_cont; SQLite gets the middle row(s) of each workflow from
    ROW_NUMBER over the same partition."""
    if connection.vendor == "postgresql":
        medians = (
            "SELECT workflow_id, CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY spent)"
            " AS numeric) AS median FROM report_runs GROUP BY workflow_id"
        )
    else:
        medians = (
            "SELECT workflow_id, AVG(spent) AS median FROM ("
            " SELECT workflow_id, spent,"
            "  ROW_NUMBER() OVER (PARTITION BY workflow_id ORDER BY spent) AS rn,"
            "  COUNT(*) OVER (PARTITION BY workflow_id) AS n"
            " FROM report_runs) ranked "
            "WHERE rn IN ((n + 1) / 2, (n + 2) / 2) GROUP BY workflow_id"
        )
    # The threshold once per workflow, not a multiplication per run compared.
    return f"SELECT workflow_id, median, {ANOMALY_FACTOR} * median AS threshold FROM ({medians}) m"


def expensive_runs(
    user, filters: ReportFilters, top: int = TOP_RUNS, max_anomalies: int = MAX_ANOMALIES
) -> dict:
    """The `top` most expensive runs and the anomalies of the report, from one statement.

    1. report_runs: the runs of the report with their cost (`filtered_runs`). With an agent or
       model filter, only the runs among them that made such a call (`_report_runs_sql`): a
       run's figures are its own totals, so a run is judged as a whole;
    2. medians: each workflow's median run cost over those same runs;
    3. the top runs by cost (a top-N sort of report_runs, then their medians), and the runs
       costing more than ANOMALY_FACTOR x their workflow's median, with the total number of
       anomalies from a window count taken before the LIMIT. Only the few rows listed are
       joined to their medians for the top list, not every run of the range;
    4. one small query adds the cached tokens and call counts of the runs listed.
    Returns {"top": [...], "anomalies": [...], "anomaly_count": int}.
    """
    inner, params = (
        filtered_runs(user, filters)
        .order_by()
        .values("id", "workflow_id", "cost", "prompt_tokens", "completion_tokens", "total_tokens")
        .query.sql_with_params()
    )
    report_runs, report_params = _report_runs_sql(inner, filters)
    columns = "run_id, workflow_id, spent, prompt, completion, tokens, median"
    run_columns = "r.run_id, r.workflow_id, r.spent, r.prompt, r.completion, r.tokens"
    sql = (
        f"WITH {report_runs}, medians AS ({_medians_sql()}) "
        f"SELECT 'top', {run_columns}, m.median, 0 FROM ("
        " SELECT * FROM report_runs ORDER BY spent DESC, run_id DESC LIMIT %s) r"
        " JOIN medians m ON m.workflow_id = r.workflow_id "
        "UNION ALL "
        f"SELECT 'anomaly', {columns}, total FROM ("
        f" SELECT {run_columns}, m.median, COUNT(*) OVER () AS total FROM report_runs r"
        " JOIN medians m ON m.workflow_id = r.workflow_id"
        " WHERE r.spent > m.threshold"
        " ORDER BY r.spent DESC, r.run_id DESC LIMIT %s) a"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, (*params, *report_params, top, max_anomalies))
        # Most expensive first in each list (a join does not keep the order it was given).
        fetched = sorted(cursor.fetchall(), key=lambda row: (row[3], row[1]), reverse=True)
    names = ["list", *[c.strip() for c in columns.split(",")], "total"]
    rows = [dict(zip(names, values, strict=True)) for values in fetched]
    ids = {row["run_id"] for row in rows}
    objects = Run.objects.select_related("workflow", "started_by").in_bulk(ids)
    extra = {
        row["run_id"]: row
        for row in UsageRecord.objects.filter(run_id__in=ids)
        .order_by()
        .values("run_id")
        .annotate(cached=Sum("cached_tokens"), calls=Count("*"))
    }
    result = {"top": [], "anomalies": [], "anomaly_count": 0}
    for row in rows:
        row.update(extra.get(row["run_id"], {}))
        _clean_figures(row)
        row["median"] = as_decimal(row["median"])
        row["median_text"] = money(row["median"])
        row["ratio"] = (
            (row["spent"] / row["median"]).quantize(Decimal("0.1")) if row["median"] else None
        )
        row["run"] = objects.get(row["run_id"])
        if row.pop("list") == "top":
            result["top"].append(row)
        else:
            result["anomalies"].append(row)
            result["anomaly_count"] = int(row["total"])
    return result


def build_report(user, filters: ReportFilters, table_limit: int = 50) -> dict:
    """Everything the reports page shows, in seven aggregate queries: five over the day range of
    the rollup (a few thousand rows for a month), the runs query over the Run range, and one
    small query over the records of the runs listed.

    On PostgreSQL the queries run in one transaction with JIT off (compiling costs more than
    it saves on these short scans) and enough work_mem to keep the hash tables in memory.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL jit = off")
                cursor.execute("SET LOCAL work_mem = '32MB'")
        daily = filtered_daily_usage(user, filters)
        series = time_series(daily, filters)
        runs = expensive_runs(user, filters)
        tables = {
            name: grouped(daily, grouping, limit=table_limit + 1)
            for name, grouping in GROUPINGS.items()
        }
    return {
        "series": series,
        "totals": totals_of(series),
        "tables": tables,
        "top_runs": runs["top"],
        "anomalies": runs["anomalies"],
        "anomaly_count": runs["anomaly_count"],
    }


# --- per-run breakdown ------------------------------------------------------------------------


def _budget_share(used, limit) -> Decimal | None:
    if limit in (None, ""):
        return None
    limit = Decimal(str(limit))
    if limit <= 0:
        return None
    return (Decimal(used) * 100 / limit).quantize(Decimal("0.1"))


def run_breakdown(run: Run) -> dict:
    """Cost and tokens of one run per step and per agent, and the share of its budget used.

    Returns {"run", "totals", "steps": [...], "agents": [...], "child_runs": [...],
    "max_cost", "cost_share_pct", "max_tokens", "token_share_pct", "reserved",
    "cap_allowances": [(cap, amount approved past it)]}: the
    template `costs/_run_breakdown.html` renders it. Only the run's own LLM calls count; a
    subworkflow's calls belong to its child run, listed under "child_runs".
    """
    records = UsageRecord.objects.filter(run=run).order_by()
    per_step_model = records.values("step_id", "model").annotate(**_sums())
    steps: dict = {}
    for row in per_step_model:
        _clean_figures(row)
        entry = steps.setdefault(row["step_id"], {**empty_figures(), "models": []})
        entry["models"].append(row["model"])
        _add_figures(entry, row)
    step_objects = Step.objects.select_related("agent").in_bulk(
        [pk for pk in steps if pk is not None]
    )
    step_rows = []
    for pk, figures in steps.items():
        step = step_objects.get(pk)
        step_rows.append(
            {
                **figures,
                "step": step,
                "label": f"{step.node_id}#{step.iteration}" if step else "(no step)",
                "agent": step.agent.name if step and step.agent else "",
                "order": (step.created_at, step.pk) if step else (run.created_at, 0),
            }
        )
    step_rows.sort(key=lambda row: row["order"])

    agents = records.values("agent_id").annotate(**_sums()).order_by("-spent")
    agent_names = dict(
        Agent.objects.filter(
            pk__in=[row["agent_id"] for row in agents if row["agent_id"]]
        ).values_list("pk", "name")
    )
    agent_rows = [
        {**_clean_figures(row), "label": agent_names.get(row["agent_id"], "(no agent)")}
        for row in agents
    ]

    children = (
        UsageRecord.objects.filter(run__parent=run)
        .order_by()
        .values("run_id")
        .annotate(**_sums())
        .order_by("run_id")
    )
    child_rows = [_clean_figures(row) for row in children]

    totals = empty_figures()
    for row in step_rows:
        _add_figures(totals, row)
    for row in step_rows + agent_rows:
        row["share_pct"] = (
            (row["spent"] * 100 / totals["spent"]).quantize(Decimal("0.1"))
            if totals["spent"]
            else None
        )
    budget = run.budget or {}
    max_cost = budget.get("max_cost")
    max_tokens = budget.get("max_tokens")
    return {
        "run": run,
        "totals": totals,
        "steps": step_rows,
        "agents": agent_rows,
        "child_runs": child_rows,
        "max_cost": Decimal(str(max_cost)) if max_cost not in (None, "") else None,
        "max_cost_text": money(max_cost) if max_cost not in (None, "") else "",
        "cost_share_pct": _budget_share(totals["spent"], max_cost),
        "max_tokens": int(max_tokens) if max_tokens not in (None, "") else None,
        "token_share_pct": _budget_share(totals["tokens"], max_tokens),
        "reserved": as_decimal(run.reserved_cost),
        "reserved_text": money(run.reserved_cost),
        "cap_allowances": [
            (key.replace("_", " ") + " cap", money(amount))
            for key, amount in cap_allowances(budget).items()
        ],
    }


# --- spend caps -------------------------------------------------------------------------------

# Spend comes from the daily rollup: today's rows are live (every call updates them in its own
# transaction), so a cap check reads a few rows per workflow, not a day of records. Past days of
# the month are summed once and cached besides (they do not change, except through a price
# recompute, which bumps the generation).
PAST_SPEND_TTL_S = 3600
_GENERATION_KEY = "baton:costs:generation"


def _generation() -> int:
    generation = cache.get(_GENERATION_KEY)
    if generation is None:
        cache.add(_GENERATION_KEY, 1, timeout=None)
        generation = cache.get(_GENERATION_KEY) or 1
    return generation


def forget_cached_spend() -> None:
    """Start a new generation of this module's cache entries: call after usage costs of past
    days changed (a recompute). Email markers are per generation too, so a cap whose figures a
    recompute changed may warn once more."""
    try:
        cache.incr(_GENERATION_KEY)
    except ValueError:
        cache.set(_GENERATION_KEY, 2, timeout=None)


def _period_starts(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    now = now.astimezone(dt.UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day.replace(day=1)


def _spend(workflow_ids: list[int], include_global: bool, now: dt.datetime) -> dict:
    """{workflow id or None (global): (spent today, spent this month)} in UTC periods."""
    day_start, month_start = _period_starts(now)
    result = {}
    today_day, month_day = day_start.date(), month_start.date()
    if workflow_ids:
        today = dict(
            UsageDaily.objects.filter(workflow_id__in=workflow_ids, day__gte=today_day)
            .order_by()
            .values("workflow_id")
            .annotate(s=Sum("cost"))
            .values_list("workflow_id", "s")
        )
    else:
        today = {}
    if include_global:
        today[None] = UsageDaily.objects.filter(day__gte=today_day).aggregate(s=Sum("cost"))["s"]

    scopes = [*workflow_ids, *([None] if include_global else [])]
    past: dict = {scope: ZERO for scope in scopes}
    if month_start < day_start and scopes:
        generation = _generation()
        keys = {
            scope: f"baton:costs:past:{generation}:{scope or 'global'}:{day_start:%Y-%m-%d}"
            for scope in scopes
        }
        cached = cache.get_many(keys.values())
        missing = [scope for scope in scopes if keys[scope] not in cached]
        fresh: dict = {}
        missing_ids = [scope for scope in missing if scope is not None]
        if missing_ids:
            fresh.update(
                UsageDaily.objects.filter(
                    workflow_id__in=missing_ids, day__gte=month_day, day__lt=today_day
                )
                .order_by()
                .values("workflow_id")
                .annotate(s=Sum("cost"))
                .values_list("workflow_id", "s")
            )
        if None in missing:
            fresh[None] = UsageDaily.objects.filter(
                day__gte=month_day, day__lt=today_day
            ).aggregate(s=Sum("cost"))["s"]
        if missing:
            cache.set_many(
                {keys[scope]: str(as_decimal(fresh.get(scope))) for scope in missing},
                timeout=PAST_SPEND_TTL_S,
            )
        for scope in scopes:
            value = cached[keys[scope]] if keys[scope] in cached else fresh.get(scope)
            past[scope] = as_decimal(value)
    for scope in scopes:
        spent_today = as_decimal(today.get(scope))
        result[scope] = (spent_today, past[scope] + spent_today)
    return result


def _in_flight(workflow_ids: list[int], include_global: bool) -> dict:
    """Cost the engine reserved for LLM calls in flight (Run.reserved_cost of active runs)."""
    active = Run.objects.filter(status__in=Run.ACTIVE, reserved_cost__gt=0).order_by()
    result = (
        dict(
            active.filter(workflow_id__in=workflow_ids)
            .values("workflow_id")
            .annotate(s=Sum("reserved_cost"))
            .values_list("workflow_id", "s")
        )
        if workflow_ids
        else {}
    )
    if include_global:
        result[None] = active.aggregate(s=Sum("reserved_cost"))["s"]
    return {scope: as_decimal(value) for scope, value in result.items()}


def global_monthly_cap() -> Decimal | None:
    cap = getattr(settings, "BATON_GLOBAL_MONTHLY_CAP", None)
    return None if cap in (None, "") else Decimal(str(cap))


@dataclass(frozen=True)
class CapStatus:
    """How much of one cap (a workflow's daily or monthly one, or the global monthly one) is
    used in the current UTC period."""

    workflow: Workflow | None  # None: the global cap
    period: str  # "daily" | "monthly"
    cap: Decimal
    spent: Decimal
    in_flight: Decimal
    period_key: str  # "2025-03-14" or "2025-03": one warning email per cap per period
    # How far approvals let the run being checked go past this cap (see `cap_breach`).
    allowance: Decimal = ZERO

    @property
    def name(self) -> str:
        if self.workflow is None:
            return f"global {self.period} cap"
        return f"workflow {self.workflow.slug} {self.period} cap"

    @property
    def key(self) -> str:
        """Which cap of a run's workflow this is: the key of a run's allowance past it."""
        return f"{'global' if self.workflow is None else 'workflow'}_{self.period}"

    @property
    def used(self) -> Decimal:
        return self.spent + self.in_flight

    @property
    def share(self) -> Decimal:
        if self.cap <= 0:
            return Decimal("Infinity") if self.used > 0 else ZERO
        return self.used / self.cap

    @property
    def scope_key(self) -> str:
        return "global" if self.workflow is None else f"wf{self.workflow.pk}"

    def _spent_phrase(self) -> str:
        when = "today" if self.period == "daily" else "this month"
        text = f"{money(self.spent)} spent {when}"
        if self.in_flight:
            text += f" + {money(self.in_flight)} in flight"
        return text

    def breached_by(self, estimate: Decimal) -> bool:
        return self.used + estimate > self.cap + self.allowance

    def breach_message(self, estimate: Decimal) -> str:
        allowed = f" + {money(self.allowance)} approved for this run" if self.allowance else ""
        return (
            f"{self.name} {money(self.cap)}{allowed} would be exceeded: "
            f"{self._spent_phrase()} + {money(estimate)} estimated"
        )

    def banner(self) -> str:
        percent = "100+" if self.share.is_infinite() else f"{self.share * 100:.0f}"
        head = self.name[0].upper() + self.name[1:]
        text = f"{head} {money(self.cap)}: {percent}% used ({self._spent_phrase()})."
        if self.used >= self.cap:
            text += " New LLM calls are refused until the period ends or the cap is raised."
        return text


def cap_statuses_for(
    workflows: list[Workflow], *, include_global: bool = True, now: dt.datetime | None = None
) -> list[CapStatus]:
    """Every cap that applies to these workflows, with its spend, in three queries at most."""
    now = now or timezone.now()
    day_start, _ = _period_starts(now)
    capped = [
        w for w in workflows if w.daily_cost_cap is not None or w.monthly_cost_cap is not None
    ]
    global_cap = global_monthly_cap() if include_global else None
    ids = [w.pk for w in capped]
    if not ids and global_cap is None:
        return []
    spend = _spend(ids, global_cap is not None, now)
    flight = _in_flight(ids, global_cap is not None)
    day_key, month_key = f"{day_start:%Y-%m-%d}", f"{day_start:%Y-%m}"
    statuses = []
    for workflow in capped:
        today, month = spend[workflow.pk]
        reserved = flight.get(workflow.pk, ZERO)
        if workflow.daily_cost_cap is not None:
            statuses.append(
                CapStatus(workflow, "daily", workflow.daily_cost_cap, today, reserved, day_key)
            )
        if workflow.monthly_cost_cap is not None:
            statuses.append(
                CapStatus(
                    workflow, "monthly", workflow.monthly_cost_cap, month, reserved, month_key
                )
            )
    if global_cap is not None:
        statuses.append(
            CapStatus(
                None, "monthly", global_cap, spend[None][1], flight.get(None, ZERO), month_key
            )
        )
    return statuses


def cap_statuses(workflow: Workflow, *, now: dt.datetime | None = None) -> list[CapStatus]:
    return cap_statuses_for([workflow], now=now)


CAP_KEYS = ("workflow_daily", "workflow_monthly", "global_monthly")
RAISE_PLACES = Decimal("0.0001")


@dataclass(frozen=True)
class CapBreach:
    """A cap that an LLM call would break: the refusal's message and, for the approval that
    may let the run go past it, the figures and a suggested raise."""

    status: CapStatus
    estimate: Decimal

    @property
    def message(self) -> str:
        return self.status.breach_message(self.estimate)

    @property
    def suggested_raise(self) -> Decimal:
        """What lets this call through and about four more like it, rounded up to 1/100 cent."""
        status = self.status
        short = status.used + self.estimate - status.cap - status.allowance
        return (short + 4 * self.estimate).quantize(RAISE_PLACES, rounding=ROUND_CEILING)

    def figures(self) -> dict:
        """The figures of an approval request, as JSON-safe strings."""
        status = self.status
        return {
            "cap": status.key,
            "cap_name": status.name,
            "period": status.period_key,
            "cap_amount": str(as_decimal(status.cap)),
            "spent": str(status.spent),
            "in_flight": str(status.in_flight),
            "estimate": str(self.estimate),
            "allowance": str(as_decimal(status.allowance)),
        }


def cap_allowances(budget: dict | None) -> dict[str, Decimal]:
    """How far approvals let a run go past each cap: `run.budget["cap_allowance"]`, a mapping
    of cap key (CAP_KEYS) to an amount. Anything unreadable (a hand-edited budget) counts as 0."""
    stored = (budget or {}).get("cap_allowance")
    if not isinstance(stored, dict):
        return {}
    allowances = {}
    for key in CAP_KEYS:
        try:
            amount = Decimal(str(stored.get(key, "0")))
        except (InvalidOperation, ValueError):
            continue
        if amount.is_finite() and amount > 0:
            allowances[key] = amount
    return allowances


def grant_cap_allowance(budget: dict | None, key: str, amount: Decimal) -> dict:
    """A copy of a run's budget whose allowance past cap `key` grew by `amount` (an approved
    request's raise). The cap itself, a setting of its own, does not change."""
    if key not in CAP_KEYS:
        raise ValueError(f"not a spend cap: {key!r}")
    allowances = cap_allowances(budget)
    allowances[key] = allowances.get(key, ZERO) + amount
    return {
        **(budget or {}),
        "cap_allowance": {name: str(value) for name, value in allowances.items()},
    }


def _amount(value) -> Decimal | None:
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return amount if amount.is_finite() else None


def cap_request_figures(payload) -> list[tuple[str, str]]:
    """The figures of a spend-cap approval request (the payload `CapBreach.figures` filled, plus
    the engine's `raise_by`) as (label, value) rows for the approval pages; [] for any other
    request. A value that is not an amount (an edited payload) is shown as it is."""
    if not isinstance(payload, dict) or payload.get("limit") != "spend_cap":
        return []

    def shown(name: str) -> str:
        amount = _amount(payload.get(name))
        return money(amount) if amount is not None else str(payload.get(name, "—"))

    when = "today" if payload.get("cap", "").endswith("_daily") else "this month"
    rows = [
        ("Cap", f"{payload.get('cap_name', '—')}, period {payload.get('period', '—')} (UTC)"),
        ("Cap amount", shown("cap_amount")),
        (f"Spent {when}", shown("spent")),
        ("Reserved for calls in flight", shown("in_flight")),
        ("This call (estimate)", shown("estimate")),
        ("Already approved for this run past the cap", shown("allowance")),
        ("Suggested raise", shown("raise_by")),
    ]
    parts = [_amount(payload.get(name)) for name in ("cap_amount", "allowance", "raise_by")]
    if None not in parts:
        rows.append(("This run's limit on this cap once approved", money(sum(parts))))
    return rows


def cap_breach(
    workflow: Workflow,
    estimate: Decimal,
    *,
    allowances: dict[str, Decimal] | None = None,
    now: dt.datetime | None = None,
) -> CapBreach | None:
    """Would an LLM call estimated at `estimate` break a spend cap? The breach says which.

    The engine calls it before every LLM call, *after* setting the estimate aside on its run
    (`Run.reserved_cost`, see runs/context.py), and releases the reservation when refused.
    Reserve-then-check needs no lock: of two concurrent calls, the later check sees the
    earlier reservation, so together they never pass on the same headroom.
    1. sum the workflow's usage today and this month (UTC), and all usage this month for the
       global cap `settings.BATON_GLOBAL_MONTHLY_CAP`;
    2. add what active runs reserved for calls in flight, minus this call's own reservation;
    3. return the first cap that `spent + in flight + estimate` would exceed, or None. A cap
       counts as `cap + allowance`, where `allowances` (`cap_allowances(run.budget)`) are what
       approvals granted the calling run: only that run may go past the cap, by that much;
    4. email staff (on commit) for caps at 80% or beyond and for a refused call, once per cap
       per period.
    """
    estimate = as_decimal(estimate)
    allowances = allowances or {}
    statuses = [
        replace(
            status,
            in_flight=max(status.in_flight - estimate, ZERO),
            allowance=allowances.get(status.key, ZERO),
        )
        for status in cap_statuses(workflow, now=now)
    ]
    breached = [status for status in statuses if status.breached_by(estimate)]
    _queue_notices(statuses, breached)
    return CapBreach(breached[0], estimate) if breached else None


def spend_warnings(workflow: Workflow, *, now: dt.datetime | None = None) -> list[str]:
    """Banner texts for the caps of this workflow (and the global one) at 80% or more."""
    return [s.banner() for s in cap_statuses(workflow, now=now) if s.share >= WARN_SHARE]


def notify_if_near_caps(workflow: Workflow, *, now: dt.datetime | None = None) -> list[str]:
    """Email staff once per cap per period when a cap reaches 80%; return the banner texts."""
    statuses = cap_statuses(workflow, now=now)
    _queue_notices(statuses, [])
    return [s.banner() for s in statuses if s.share >= WARN_SHARE]


def warnings_for_user(user, *, now: dt.datetime | None = None) -> list[str]:
    """Banners for the reports page: the caps of the workflows the user sees at 80% or more
    (the global cap for staff only: its figures are everybody's spend)."""
    workflows = list(
        Workflow.objects.for_user(user)
        .filter(Q(daily_cost_cap__isnull=False) | Q(monthly_cost_cap__isnull=False))
        .order_by("slug")
    )
    statuses = cap_statuses_for(workflows, include_global=user.is_staff, now=now)
    return [s.banner() for s in statuses if s.share >= WARN_SHARE]


def _queue_notices(statuses: list[CapStatus], breached: list[CapStatus]) -> None:
    """Send, after the caller's transaction commits, each email not sent yet this period: the
    80% warning and, when a call was refused, the cap-reached notice. A rolled-back caller
    sends nothing and claims no marker, so the next check tries again."""
    notices = [("warning", s) for s in statuses if s.share >= WARN_SHARE]
    notices += [("reached", s) for s in breached]
    for level, status in notices:
        transaction.on_commit(lambda level=level, status=status: _send_notice_once(level, status))


def _send_notice_once(level: str, status: CapStatus) -> bool:
    # cache.add is atomic on a shared cache (Redis, memcached, database): of all workers that
    # see the cap cross 80% this period, exactly one claims the marker and sends.
    key = (
        f"baton:costs:notice:{_generation()}:{level}:{status.scope_key}:{status.period}:"
        f"{status.period_key}"
    )
    timeout = 2 * 86400 if status.period == "daily" else 32 * 86400
    if not cache.add(key, 1, timeout=timeout):
        return False
    if level == "warning":
        percent = min(status.share, Decimal("9.99")) * 100
        subject = f"Baton: {status.name} is {percent:.0f}% used"
    else:
        subject = f"Baton: {status.name} reached, LLM calls refused"
    body = status.banner()
    if status.workflow is not None:
        body += f"\n\nWorkflow: {status.workflow.name} (/costs/?workflow={status.workflow.slug})"
    body += f"\nCap: {money(status.cap)}\nPeriod: {status.period_key} (UTC)\n"
    recipients = list(
        get_user_model()
        .objects.filter(is_staff=True, is_active=True)
        .exclude(email="")
        .values_list("email", flat=True)
    )
    try:
        if recipients:
            send_mail(subject, body, None, recipients)
        else:
            mail_admins(subject, body)
    except Exception:
        # A mail server hiccup must not break an LLM call; let the next check retry.
        log.exception("Could not send the spend cap email %r", subject)
        cache.delete(key)
        return False
    return True


# --- daily rollup -----------------------------------------------------------------------------

_KEY_COLUMNS = ("day", "workflow_id", "agent_id", "model", "user_id")
_SUM_COLUMNS = (
    "cost",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "call_count",
)
# The expressions of UsageDaily's unique constraint `usage_daily_key`, so PostgreSQL and SQLite
# both infer that index as the upsert's conflict target.
_CONFLICT_TARGET = (
    "(day, (COALESCE(workflow_id, 0)), (COALESCE(agent_id, 0)), model, (COALESCE(user_id, 0)))"
)
_receivers_paused = contextvars.ContextVar("baton_daily_usage_receivers_paused", default=False)


def _utc_day_sql() -> str:
    """The UTC day of UsageRecord.at in SQL. SQLite stores aware datetimes as UTC text."""
    if connection.vendor == "postgresql":
        return "CAST((at AT TIME ZONE 'UTC') AS date)"
    return "date(at)"


def _upsert_sql(source: str) -> str:
    """INSERT the rows of `source` (VALUES or a SELECT of key and sum columns) into UsageDaily,
    adding each to the row of its key when there is one. One statement: concurrent writers of
    one key queue on that row's lock and each adds its own figures, none is lost."""
    table = rows.table(UsageDaily)
    adds = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in _SUM_COLUMNS)
    return (
        f"INSERT INTO {table} ({', '.join(_KEY_COLUMNS)}, {', '.join(_SUM_COLUMNS)}) {source} "
        f"ON CONFLICT {_CONFLICT_TARGET} DO UPDATE SET {adds}"
    )


def _record_sums_sql(sign: str = "") -> str:
    """Key and sums of UsageRecord rows grouped by rollup key (negated with sign="-")."""
    day = _utc_day_sql()
    return (
        f"SELECT {day}, workflow_id, agent_id, model, user_id, {sign}SUM(cost), "
        f"{sign}SUM(prompt_tokens), {sign}SUM(completion_tokens), {sign}SUM(cached_tokens), "
        f"{sign}SUM(total_tokens), {sign}COUNT(*) FROM {rows.table(UsageRecord)} WHERE {{where}} "
        f"GROUP BY {day}, workflow_id, agent_id, model, user_id"
    )


def add_to_daily_usage(record: UsageRecord) -> None:
    """Count one recorded LLM call in the daily rollup: one upsert statement.

    Call it in the transaction that inserts the record (StepContext._record_call does), so the
    rollup and the records commit together. Make it the transaction's last write: the row of a
    busy key (same day, workflow, agent, model and user) is then locked only until the commit.
    """
    ops = connection.ops
    day = record.at.astimezone(dt.UTC).date()
    params = [
        ops.adapt_datefield_value(day),
        record.workflow_id,
        record.agent_id,
        record.model,
        record.user_id,
        Decimal(str(record.cost)),
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.total_tokens,
        1,
    ]
    with connection.cursor() as cursor:
        cursor.execute(_upsert_sql(f"VALUES ({', '.join(['%s'] * len(params))})"), params)


def _day_bounds(first_day: dt.date, last_day: dt.date) -> list:
    since = dt.datetime.combine(first_day, dt.time.min, tzinfo=dt.UTC)
    until = dt.datetime.combine(last_day + dt.timedelta(days=1), dt.time.min, tzinfo=dt.UTC)
    return [connection.ops.adapt_datetimefield_value(value) for value in (since, until)]


def rebuild_daily_usage(first_day: dt.date, last_day: dt.date, *, model: str | None = None) -> int:
    """Recompute the rollup of the UTC days [first_day, last_day] (of one model, if given) from
    the usage records. Returns the number of rollup rows written.

    1. Lock the rollup against writers. On PostgreSQL, SHARE ROW EXCLUSIVE waits for the
       transactions that already upserted and holds off new upserts until the commit; a call
       recorded meanwhile commits after us and adds itself to the rebuilt row. (SQLite has one
       writer at a time anyway.)
    2. Delete the rows of those days.
    3. Insert the sums of the records of those days, grouped by key: one INSERT ... SELECT.
    """
    table = rows.table(UsageDaily)
    where = "at >= %s AND at < %s"
    params = _day_bounds(first_day, last_day)
    if model is not None:
        where += " AND model = %s"
        params.append(model)
    stale = UsageDaily.objects.filter(day__gte=first_day, day__lte=last_day)
    if model is not None:
        stale = stale.filter(model=model)
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
        stale.delete()
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(_KEY_COLUMNS)}, {', '.join(_SUM_COLUMNS)}) "
            + _record_sums_sql().format(where=where),
            params,
        )
        return cursor.rowcount


def remove_run_from_daily_usage(run_id: int) -> None:
    """Take a run's calls out of the rollup before the run (and its records, by cascade) is
    deleted: the pre_delete receiver of Run calls it inside the deletion's transaction.

    1. Lock the run row: a call of this run being recorded right now commits first, and no new
       one can start (its record insert needs a key-share lock on the run).
    2. Upsert the run's sums, negated, into the rollup.
    3. Delete the rows of those days left with no calls, so the reports show no empty groups.
    """
    if _receivers_paused.get():
        return
    with transaction.atomic():
        list(Run.objects.select_for_update().filter(pk=run_id).values_list("pk", flat=True))
        span = UsageRecord.objects.filter(run_id=run_id).aggregate(first=Min("at"), last=Max("at"))
        if span["first"] is None:
            return
        with connection.cursor() as cursor:
            cursor.execute(
                _upsert_sql(_record_sums_sql(sign="-").format(where="run_id = %s")), [run_id]
            )
        UsageDaily.objects.filter(
            day__gte=span["first"].astimezone(dt.UTC).date(),
            day__lte=span["last"].astimezone(dt.UTC).date(),
            call_count__lte=0,
        ).delete()


def fold_deleted_key_in_daily_usage(column: str, pk: int) -> None:
    """A workflow, agent or user is being deleted: its records' column becomes NULL (SET_NULL),
    so move its rollup rows onto the NULL key, adding them to rows already there. The pre_delete
    receivers call it inside the deletion's transaction."""
    if _receivers_paused.get():
        return
    if column not in ("workflow_id", "agent_id", "user_id"):
        raise ValueError(f"not a rollup key column: {column}")
    table = rows.table(UsageDaily)
    keys = ", ".join("CAST(NULL AS bigint)" if name == column else name for name in _KEY_COLUMNS)
    source = f"SELECT {keys}, {', '.join(_SUM_COLUMNS)} FROM {table} WHERE {column} = %s"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_upsert_sql(source), [pk])
        cursor.execute(f"DELETE FROM {table} WHERE {column} = %s", [pk])


@contextmanager
def daily_usage_receivers_paused() -> Iterator[None]:
    """Skip the rollup's delete receivers in this context (thread / task), for a bulk deletion
    that rebuilds the days it touched afterwards (`make_usage_fixture --clear` does): one
    rebuild instead of a statement per deleted run."""
    token = _receivers_paused.set(True)
    try:
        yield
    finally:
        _receivers_paused.reset(token)


# --- admin ------------------------------------------------------------------------------------


@admin.action(
    description="Recompute usage costs from the selected prices' dates on",
    permissions=["change"],
)
def recompute_action(modeladmin, request, queryset) -> None:
    """Reprice the usage of the selected prices' models from the earliest selected
    `effective_from` to today: each record gets the price in force at its own time
    (runs.pricing.recompute_usage, in SQL). Then bring the totals of finished runs and their
    steps in line, so the run pages agree with the reports. Active runs keep the counters the
    engine is updating: rewriting them here could race a call being recorded."""
    from runs.pricing import recompute_usage

    earliest: dict[str, dt.datetime] = {}
    for model, since in queryset.order_by().values_list("model", "effective_from"):
        if model not in earliest or since < earliest[model]:
            earliest[model] = since
    today = timezone.now().astimezone(dt.UTC).date()
    changed = 0
    for model, since in sorted(earliest.items()):
        changed += recompute_usage(since, today, model=model)
        touched = UsageRecord.objects.filter(model=model, at__gte=since)
        _refresh_totals(
            Run.objects.filter(pk__in=touched.values("run_id"), status__in=Run.TERMINAL), "run"
        )
        _refresh_totals(
            Step.objects.filter(pk__in=touched.values("step_id"), run__status__in=Run.TERMINAL),
            "step",
        )
    forget_cached_spend()
    modeladmin.message_user(
        request,
        f"Recomputed {changed} usage record(s) of {len(earliest)} model(s) "
        f"({', '.join(sorted(earliest)) or 'none'}).",
        messages.SUCCESS,
    )


def _refresh_totals(queryset: QuerySet, column: str) -> int:
    """Set each row's cost to the sum of its usage records: one UPDATE with a subquery."""
    usage_sum = (
        UsageRecord.objects.filter(**{column: OuterRef("pk")})
        .order_by()
        .values(column)
        .annotate(s=Sum("cost"))
        .values("s")
    )
    return queryset.update(cost=Coalesce(Subquery(usage_sum), ZERO))
