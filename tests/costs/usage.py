"""Plain helpers: runs and usage records made directly, with hand-picked figures."""

import datetime as dt
from decimal import Decimal

from django.db import transaction
from django.db.models import Count, F, Sum
from django.db.models.functions import TruncDate

from runs import costs
from runs.models import Run, UsageDaily, UsageRecord


def at(
    month: int, day: int, hour: int = 12, minute: int = 0, second: int = 0, year: int = 2025
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)


def make_run(workflow, user, status: str = Run.SUCCEEDED, **fields) -> Run:
    return Run.objects.create(
        workflow=workflow,
        version=workflow.latest_version(),
        started_by=user,
        status=status,
        **fields,
    )


def make_usage(
    run: Run,
    agent,
    cost: str,
    prompt: int = 0,
    completion: int = 0,
    cached: int = 0,
    when: dt.datetime | None = None,
    *,
    step=None,
    call_index: int = 0,
    model: str | None = None,
) -> UsageRecord:
    """One LLM call, recorded as the engine does: the run's totals grow with it, the daily
    rollup counts it (through the function StepContext._record_call uses, in the same
    transaction), and a run is created no later than its first call."""
    when = when or dt.datetime.now(dt.UTC)
    with transaction.atomic():
        Run.objects.filter(pk=run.pk).update(
            cost=F("cost") + Decimal(cost),
            prompt_tokens=F("prompt_tokens") + prompt,
            completion_tokens=F("completion_tokens") + completion,
            total_tokens=F("total_tokens") + prompt + completion,
        )
        Run.objects.filter(pk=run.pk, created_at__gt=when).update(created_at=when)
        record = UsageRecord.objects.create(
            run=run,
            step=step,
            call_index=call_index,
            workflow=run.workflow,
            agent=agent,
            user=run.started_by,
            model=model or (agent.model if agent else "openai/gpt-4o-mini"),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            total_tokens=prompt + completion,
            cost=Decimal(cost),
            at=when,
        )
        costs.add_to_daily_usage(record)
    return record


KEY = ("day", "workflow_id", "agent_id", "model", "user_id")


def rollup_rows() -> dict:
    return {
        tuple(row[name] for name in KEY): (
            row["cost"],
            row["prompt_tokens"],
            row["completion_tokens"],
            row["cached_tokens"],
            row["total_tokens"],
            row["call_count"],
        )
        for row in UsageDaily.objects.values()
    }


def record_sums() -> dict:
    """What the rollup must hold: the records summed per UTC day and key."""
    rows = (
        UsageRecord.objects.order_by()
        .annotate(day=TruncDate("at", tzinfo=dt.UTC))
        .values(*KEY)
        .annotate(
            c=Sum("cost"),
            p=Sum("prompt_tokens"),
            o=Sum("completion_tokens"),
            k=Sum("cached_tokens"),
            t=Sum("total_tokens"),
            n=Count("*"),
        )
    )
    return {
        tuple(row[name] for name in KEY): (
            costs.as_decimal(row["c"]),
            row["p"],
            row["o"],
            row["k"],
            row["t"],
            row["n"],
        )
        for row in rows
    }


def assert_rollup_matches_records() -> None:
    """The rollup holds exactly the sums of the records: no group missing, extra or off."""
    rolled = {key: (costs.as_decimal(v[0]), *v[1:]) for key, v in rollup_rows().items()}
    assert rolled == record_sums()
