"""Plain helpers: runs and usage records made directly, with hand-picked figures."""

import datetime as dt
from decimal import Decimal

from django.db.models import F

from runs.models import Run, UsageRecord


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
    """One LLM call, recorded as the engine does: the run's totals grow with it, and a run is
    created no later than its first call."""
    when = when or dt.datetime.now(dt.UTC)
    Run.objects.filter(pk=run.pk).update(
        cost=F("cost") + Decimal(cost),
        prompt_tokens=F("prompt_tokens") + prompt,
        completion_tokens=F("completion_tokens") + completion,
        total_tokens=F("total_tokens") + prompt + completion,
    )
    Run.objects.filter(pk=run.pk, created_at__gt=when).update(created_at=when)
    return UsageRecord.objects.create(
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
