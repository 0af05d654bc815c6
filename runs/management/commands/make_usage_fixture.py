"""Bulk-create realistic runs, steps and usage records: the data set of the cost report
benchmark (1M usage records / 100k runs in a few minutes).

Everything it makes is named `fixture-...` (users, agents, workflows), so `--clear` removes a
previous fixture, and nothing else, before making a new one. The records are bulk-inserted, so
the daily rollup the reports read is rebuilt afterwards for the days they (and a cleared
fixture) cover, from all records of those days.

    manage.py make_usage_fixture --records 1000000 --runs 100000 --days 90 --clear
"""

from __future__ import annotations

import datetime as dt
import io
import random
import time
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.db.models import Max, Min
from django.utils import timezone

from runs import costs
from runs.models import Run, Step, UsageDaily, UsageRecord
from teams.models import Agent, Role, Workflow, WorkflowVersion

PREFIX = "fixture-"
MILLION = Decimal(1_000_000)
Q8 = Decimal("0.00000001")

# (model, input $/1M, output $/1M, cached input $/1M, share of agents using it)
MODELS = [
    ("openai/gpt-4o-mini", Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), 5),
    ("openai/gpt-4o", Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), 2),
    ("anthropic/claude-3-5-sonnet-20241022", Decimal("3.00"), Decimal("15.00"), Decimal("0.30"), 2),
    ("anthropic/claude-3-5-haiku-20241022", Decimal("0.80"), Decimal("4.00"), Decimal("0.08"), 2),
    ("ollama/llama3.1", Decimal(0), Decimal(0), Decimal(0), 1),
    ("scripted/baton", Decimal(0), Decimal(0), Decimal(0), 1),
]

SPEC = {
    "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}}},
    "nodes": [{"id": "work", "kind": "agent", "agent": f"{PREFIX}agent-01", "prompt": "{topic}"}],
    "edges": [],
}


class Command(BaseCommand):
    help = "Bulk-create fixture runs and usage records for the cost report benchmark."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--records", type=int, default=100_000, help="Usage records to create (default 100000)."
        )
        parser.add_argument(
            "--runs",
            type=int,
            default=None,
            help="Runs to spread them over (default: records / 10).",
        )
        parser.add_argument(
            "--days", type=int, default=90, help="Spread over the last N days (default 90)."
        )
        parser.add_argument("--workflows", type=int, default=25)
        parser.add_argument("--agents", type=int, default=40)
        parser.add_argument("--users", type=int, default=30)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument(
            "--clear",
            action="store_true",
            help="Delete the previous fixture (rows named fixture-...) first.",
        )

    def handle(
        self,
        *args,
        records: int,
        runs: int | None,
        days: int,
        workflows: int,
        agents: int,
        users: int,
        seed: int,
        clear: bool,
        **options,
    ) -> None:
        if records < 1 or days < 1 or workflows < 1 or agents < 1 or users < 1:
            raise CommandError("--records, --days, --workflows, --agents and --users must be >= 1")
        runs = runs or max(1, records // 10)
        if runs > records:
            raise CommandError("--runs cannot exceed --records (every run makes a call)")
        rng = random.Random(seed)
        started = time.monotonic()
        # The UTC days of the new records, whose rollup is rebuilt at the end.
        self._days: set[dt.date] = set()
        if clear:
            self._clear()
        people, agent_rows, flows = self._design(rng, users, agents, workflows)
        now = timezone.now()
        self.stdout.write(f"Creating {runs} runs and {records} usage records over {days} days...")
        chunk = 2000
        made_runs = made_records = 0
        while made_runs < runs:
            count = min(chunk, runs - made_runs)
            # Spread the records evenly: this chunk gets its share of what is left.
            share = round((records - made_records) * count / (runs - made_runs))
            self._make_chunk(rng, count, max(share, count), now, days, people, agent_rows, flows)
            made_runs += count
            made_records += max(share, count)
            if made_runs % 20000 < chunk:
                self.stdout.write(
                    f"  {made_runs} runs, {made_records} records, "
                    f"{time.monotonic() - started:.0f} s"
                )
        rolled = time.monotonic()
        costs.rebuild_daily_usage(min(self._days), max(self._days))
        self.stdout.write(f"Rebuilt the daily rollup in {time.monotonic() - rolled:.1f} s.")
        if connection.vendor == "postgresql":
            # VACUUM, as autovacuum does soon after a bulk load: it sets the visibility map the
            # reports' index-only scans rely on (without it they read the whole table). Inside a
            # transaction (a test), where VACUUM cannot run, only ANALYZE.
            command = "ANALYZE" if connection.in_atomic_block else "VACUUM (ANALYZE)"
            with connection.cursor() as cursor:
                for model in (UsageRecord, Run, UsageDaily):
                    cursor.execute(f"{command} {connection.ops.quote_name(model._meta.db_table)}")
        self.stdout.write(
            self.style.SUCCESS(
                f"Made {made_runs} runs and {made_records} usage records in "
                f"{time.monotonic() - started:.1f} s."
            )
        )

    # --- design objects -----------------------------------------------------------------------

    def _clear(self) -> None:
        flows = Workflow.objects.filter(slug__startswith=PREFIX)
        span = UsageRecord.objects.filter(workflow__in=flows).aggregate(
            first=Min("at"), last=Max("at")
        )
        # One rebuild of the cleared days, in the deletion's transaction (before the rollup's
        # foreign keys are checked at commit), instead of a rollup statement per deleted run,
        # agent and user.
        with transaction.atomic(), costs.daily_usage_receivers_paused():
            UsageRecord.objects.filter(workflow__in=flows).delete()
            Step.objects.filter(run__workflow__in=flows).delete()
            Run.objects.filter(workflow__in=flows).delete()
            WorkflowVersion.objects.filter(workflow__in=flows).delete()
            flows.delete()
            Agent.objects.filter(name__startswith=PREFIX).delete()
            Role.objects.filter(name__startswith=PREFIX).delete()
            get_user_model().objects.filter(username__startswith=PREFIX).delete()
            if span["first"] is not None:
                costs.rebuild_daily_usage(
                    span["first"].astimezone(dt.UTC).date(), span["last"].astimezone(dt.UTC).date()
                )
        self.stdout.write("Cleared the previous fixture.")

    def _design(self, rng: random.Random, users: int, agents: int, workflows: int):
        User = get_user_model()
        people = []
        for index in range(1, users + 1):
            person, _ = User.objects.get_or_create(
                username=f"{PREFIX}user-{index:02d}",
                defaults={"email": f"{PREFIX}user-{index:02d}@example.com"},
            )
            people.append(person)
        role, _ = Role.objects.get_or_create(name=f"{PREFIX}role", defaults={"goal": "Benchmark"})
        weights = [model[4] for model in MODELS]
        agent_rows = []
        for index in range(1, agents + 1):
            model = rng.choices(MODELS, weights=weights)[0]
            agent, _ = Agent.objects.get_or_create(
                name=f"{PREFIX}agent-{index:02d}", defaults={"role": role, "model": model[0]}
            )
            agent_rows.append((agent, next(m for m in MODELS if m[0] == agent.model)))
        flows = []
        for index in range(1, workflows + 1):
            owner = people[index % len(people)]
            flow, created = Workflow.objects.get_or_create(
                slug=f"{PREFIX}wf-{index:02d}",
                defaults={"name": f"Fixture workflow {index:02d}", "owner": owner, "draft": SPEC},
            )
            if created:
                flow.members.set(rng.sample(people, k=min(3, len(people))))
            version = flow.versions.order_by("-number").first() or WorkflowVersion.objects.create(
                workflow=flow, number=1, spec=SPEC, note="fixture"
            )
            team = rng.sample(agent_rows, k=min(len(agent_rows), rng.randint(2, 4)))
            members = list(flow.members.all()) + [owner]
            # A few workflows are far busier than the rest, as in real installations.
            flows.append((flow, version, team, members, 1 / index))
        return people, agent_rows, flows

    # --- bulk rows ----------------------------------------------------------------------------

    def _make_chunk(
        self,
        rng: random.Random,
        count: int,
        calls: int,
        now: dt.datetime,
        days: int,
        people,
        agent_rows,
        flows,
    ) -> None:
        # How many calls each run makes: at least one, the rest spread at random.
        per_run = [1] * count
        for _ in range(calls - count):
            per_run[rng.randrange(count)] += 1
        weights = [flow[4] for flow in flows]
        run_rows, plans = [], []
        for run_calls in per_run:
            flow, version, team, members, _ = rng.choices(flows, weights=weights)[0]
            created = now - dt.timedelta(seconds=rng.uniform(0, days * 86400))
            # One run in a hundred goes off the rails: long prompts, many tokens.
            blowup = rng.uniform(6, 12) if rng.random() < 0.01 else 1.0
            user = rng.choice(members)
            usage, totals = [], [0, 0, Decimal(0)]
            for call in range(run_calls):
                slot = call % len(team)
                agent, (model, price_in, price_out, price_cached, _) = team[slot]
                prompt = int(rng.lognormvariate(7.2, 0.8) * blowup)
                cached = int(prompt * rng.choice((0, 0, 0.3, 0.6)))
                completion = int(rng.lognormvariate(5.5, 0.7) * blowup)
                cost = (
                    (prompt - cached) * price_in + cached * price_cached + completion * price_out
                ) / MILLION
                cost = cost.quantize(Q8)
                at = created + dt.timedelta(seconds=call * rng.uniform(0.5, 6))
                self._days.add(at.astimezone(dt.UTC).date())
                usage.append(
                    (
                        slot,
                        call // len(team),
                        agent.pk,
                        model,
                        prompt,
                        completion,
                        cached,
                        cost,
                        rng.randint(200, 4000),
                        at,
                    )
                )
                totals[0] += prompt
                totals[1] += completion
                totals[2] += cost
            plans.append((flow, team, user, usage))
            run_rows.append(
                Run(
                    workflow=flow,
                    version=version,
                    input={"topic": "benchmark"},
                    status=rng.choices(
                        [Run.SUCCEEDED, Run.FAILED, Run.BUDGET_EXCEEDED], weights=[90, 8, 2]
                    )[0],
                    started_by=user,
                    created_at=created,
                    started_at=created,
                    finished_at=created + dt.timedelta(seconds=rng.uniform(2, 90)),
                    prompt_tokens=totals[0],
                    completion_tokens=totals[1],
                    total_tokens=totals[0] + totals[1],
                    cost=totals[2],
                    step_count=len(team),
                )
            )
        created_field = Run._meta.get_field("created_at")
        with transaction.atomic():
            # created_at is auto_now_add: keep the spread-out dates instead of "now".
            created_field.auto_now_add = False
            try:
                run_rows = Run.objects.bulk_create(run_rows, batch_size=1000)
            finally:
                created_field.auto_now_add = True
            step_rows = [
                Step(
                    run=run,
                    node_id=f"node-{index}",
                    kind="agent",
                    agent=agent,
                    status=Step.SUCCEEDED,
                    started_at=run.created_at,
                    finished_at=run.finished_at,
                )
                for run, (_, team, _, _) in zip(run_rows, plans, strict=True)
                for index, (agent, _) in enumerate(team)
            ]
            step_rows = Step.objects.bulk_create(step_rows, batch_size=2000)
            steps = iter(step_rows)
            usage_rows = []
            for run, (flow, team, user, usage) in zip(run_rows, plans, strict=True):
                run_steps = [next(steps).pk for _ in team]
                for (
                    slot,
                    call_index,
                    agent_id,
                    model,
                    prompt,
                    completion,
                    cached,
                    cost,
                    latency,
                    at,
                ) in usage:
                    usage_rows.append(
                        {
                            "run_id": run.pk,
                            "step_id": run_steps[slot],
                            "epoch": 0,
                            "call_index": call_index,
                            "workflow_id": flow.pk,
                            "agent_id": agent_id,
                            "user_id": user.pk,
                            "model": model,
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "cached_tokens": cached,
                            "total_tokens": prompt + completion,
                            "cost": cost,
                            "price_source": "fixture",
                            "latency_ms": latency,
                            "at": at,
                        }
                    )
            self._insert_usage(usage_rows)

    def _insert_usage(self, rows: list[dict]) -> None:
        """COPY on PostgreSQL (several times faster than INSERT), bulk_create elsewhere."""
        if connection.vendor != "postgresql":
            UsageRecord.objects.bulk_create([UsageRecord(**row) for row in rows], batch_size=2000)
            return
        names = [*rows[0], "response"]
        columns = ", ".join(
            connection.ops.quote_name(UsageRecord._meta.get_field(name.removesuffix("_id")).column)
            for name in names
        )
        table = connection.ops.quote_name(UsageRecord._meta.db_table)
        buffer = io.StringIO()
        for row in rows:
            buffer.write(
                "\t".join(
                    value.isoformat() if isinstance(value, dt.datetime) else str(value)
                    for value in row.values()
                )
            )
            buffer.write("\t{}\n")
        with connection.cursor() as cursor:
            with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                copy.write(buffer.getvalue())
