"""Recompute the daily usage rollup (UsageDaily) from the usage records.

The rollup is kept up to date as calls are recorded, repriced and deleted; rebuild it after
changing records by other means (raw SQL, a restore of the usage table, a bulk import):

    manage.py rebuild_usage_rollup                      # every day with records
    manage.py rebuild_usage_rollup --start 2025-03-01 --end 2025-03-31
"""

from __future__ import annotations

import datetime as dt
import time

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Max, Min

from runs import costs
from runs.models import UsageDaily, UsageRecord

# One transaction per slice of days: a rebuild holds off recording calls (the rollup is locked)
# while it runs, so a long history goes in short steps.
SLICE_DAYS = 7


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"{value!r} is not a date (YYYY-MM-DD)") from exc


class Command(BaseCommand):
    help = "Recompute the daily usage rollup the cost reports read, from the usage records."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--start", type=_date, help="First UTC day (default: the oldest).")
        parser.add_argument("--end", type=_date, help="Last UTC day (default: the newest).")

    def handle(self, *args, start, end, **options) -> None:
        # call_command(start="2025-03-01") passes the text through without `type`.
        start = _date(start) if isinstance(start, str) else start
        end = _date(end) if isinstance(end, str) else end
        if start is None or end is None:
            span = UsageRecord.objects.aggregate(first=Min("at"), last=Max("at"))
            rolled = UsageDaily.objects.aggregate(first=Min("day"), last=Max("day"))
            days = [
                *(value.astimezone(dt.UTC).date() for value in span.values() if value),
                *(value for value in rolled.values() if value),
            ]
            if not days:
                self.stdout.write("No usage recorded: nothing to rebuild.")
                return
            start = start or min(days)
            end = end or max(days)
        if start > end:
            raise CommandError("--start is after --end")
        began = time.monotonic()
        rows = 0
        first = start
        while first <= end:
            last = min(first + dt.timedelta(days=SLICE_DAYS - 1), end)
            rows += costs.rebuild_daily_usage(first, last)
            first = last + dt.timedelta(days=1)
        self.stdout.write(
            self.style.SUCCESS(
                f"Rebuilt the usage rollup from {start} to {end}: {rows} row(s) in "
                f"{time.monotonic() - began:.1f} s."
            )
        )
