"""The daily usage rollup (UsageDaily): it always equals the sums of the usage records it rolls
up, whatever writes them (parallel calls, a price recompute, deletions), and the reports read it.
"""

import datetime as dt
import io
import threading
from decimal import Decimal as D

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext

from runs import costs, engine, events, pricing
from runs.context import StepContext
from runs.llm import LLMResult
from runs.models import ModelPrice, Run, Step, UsageDaily, UsageRecord
from tests.costs.conftest import MARCH
from tests.costs.usage import assert_rollup_matches_records, at, make_run, make_usage
from tests.factories import make_agent, make_workflow, pipeline_spec


def march(**fields) -> costs.ReportFilters:
    return costs.ReportFilters(start=dt.date(2025, 3, 1), end=dt.date(2025, 3, 31), **fields)


# --- concurrent writers -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_parallel_calls_of_one_key_all_add_up_in_the_rollup(alice):
    """Threads record calls through the engine's own path (StepContext._record_call), all on
    the same day, workflow, agent and model: on PostgreSQL (DATABASE_URL set) they race on one
    rollup row per user; on SQLite they queue for the write lock. None is lost, and the runs
    nobody started share one row (NULL user), on both databases."""
    threads_per_run, calls_per_thread = 4, 12
    agent = make_agent("writer", model="acme/rollup")
    ModelPrice.objects.create(
        model="acme/rollup",
        input_per_1m=D("1.5"),
        output_per_1m=D("4"),
        cached_input_per_1m=D("0.5"),
        effective_from=at(1, 1),
    )
    workflow = make_workflow(pipeline_spec("writer"), owner=alice, slug="rollup")
    runs = [make_run(workflow, alice, status=Run.RUNNING), make_run(workflow, None)]
    steps = [
        Step.objects.create(run=run, node_id=f"go{index}", kind="agent", agent=agent)
        for run in runs
        for index in range(threads_per_run)
    ]
    start = threading.Barrier(len(steps))
    errors: list[BaseException] = []

    def record_calls(step: Step, seed: int) -> None:
        try:
            run = Run.objects.select_related("workflow").get(pk=step.run_id)
            context = StepContext(step, run, {"id": step.node_id}, {})
            start.wait(timeout=30)
            for index in range(calls_per_thread):
                prompt = 1000 + seed * 37 + index
                result = LLMResult(
                    text="ok",
                    tool_calls=[],
                    prompt_tokens=prompt,
                    completion_tokens=100 + index,
                    cached_tokens=index * 10,
                    total_tokens=prompt + 100 + index,
                    cost=D(0),
                    model="acme/rollup",
                    latency_ms=1,
                    finish_reason="stop",
                )
                context._record_call(agent, index, result, D(0), 0)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=record_calls, args=(step, seed)) for seed, step in enumerate(steps)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # The calls' events are rendered by a background publisher that reads the database: let it
    # finish while this test may still use the database.
    for _ in range(12):
        if events.flush():
            break

    assert not errors, errors
    calls = len(steps) * calls_per_thread
    assert UsageRecord.objects.count() == calls
    assert_rollup_matches_records()
    rows = list(UsageDaily.objects.all())
    assert len(rows) == 2
    assert {row.user_id: row.call_count for row in rows} == {alice.pk: calls // 2, None: calls // 2}
    spent = UsageRecord.objects.aggregate(s=Sum("cost"))["s"]
    assert costs.as_decimal(sum(row.cost for row in rows)) == costs.as_decimal(spent) > 0


@pytest.mark.integration
def test_parallel_branches_on_a_worker_add_up_in_the_rollup(celery_worker, alice):
    names = [f"branch{i}" for i in range(5)]
    make_agent("writer")
    spec = {
        "input_schema": {"type": "object"},
        "nodes": [
            {"id": "fan", "kind": "parallel"},
            *({"id": name, "kind": "agent", "agent": "writer", "prompt": "Go"} for name in names),
            {"id": "join", "kind": "join"},
        ],
        "edges": [
            *({"source": "fan", "target": name} for name in names),
            *({"source": name, "target": "join"} for name in names),
        ],
    }
    workflow = make_workflow(spec, owner=alice)

    run = engine.wait_for(engine.start_run(workflow.latest_version(), {}, alice), timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert UsageRecord.objects.filter(run=run).count() == len(names)
    assert_rollup_matches_records()
    row = UsageDaily.objects.get()
    assert (row.workflow_id, row.user_id, row.call_count, row.cost) == (
        workflow.pk,
        alice.pk,
        len(names),
        run.cost,
    )


# --- keeping it equal to the records ----------------------------------------------------------


@pytest.mark.django_db
def test_calls_of_runs_nobody_started_share_one_row_per_day(world):
    agent = world["writer"]
    run = make_run(world["alpha"], None)
    make_usage(run, agent, "0.01", 10, 1, 0, at(3, 20, 1))
    make_usage(run, agent, "0.02", 20, 2, 0, at(3, 20, 2))

    row = UsageDaily.objects.get(user=None)

    assert (row.day, row.call_count, row.cost) == (dt.date(2025, 3, 20), 2, D("0.03"))
    assert_rollup_matches_records()


@pytest.mark.django_db
def test_recompute_rebuilds_the_rollup_of_the_repriced_days_only(alice, world):
    writer, critic = world["writer"], world["critic"]
    run = make_run(world["beta"], alice)
    make_usage(run, writer, "0.50", 1_000_000, 0, 0, at(2, 20))
    make_usage(run, writer, "0.50", 1_000_000, 1_000_000, 0, at(3, 18))
    make_usage(run, critic, "0.70", 10, 10, 0, at(3, 18))  # another model, same day
    ModelPrice.objects.create(
        model=writer.model, input_per_1m=D("1"), output_per_1m=D("2"), effective_from=at(3, 1, 0)
    )

    pricing.recompute_usage(dt.date(2025, 3, 1), dt.date(2025, 3, 31), model=writer.model)

    assert_rollup_matches_records()
    day = UsageDaily.objects.get(day=dt.date(2025, 3, 18), model=writer.model)
    assert day.cost == D("3.00")
    assert UsageDaily.objects.get(day=dt.date(2025, 3, 18), model=critic.model).cost == D("0.70")
    assert UsageDaily.objects.get(day=dt.date(2025, 2, 20)).cost == D("0.50")
    # alice's other March writer calls are repriced too: r1 900 uncached in (100 cached at
    # $0) + 200 out = $0.0013; r2 500 in + 100 out = $0.0007.
    report = costs.build_report(alice, march(model=writer.model))
    assert report["totals"]["spent"] == D("3.00") + D("0.0013") + D("0.0007")


@pytest.mark.django_db
def test_deleting_a_run_takes_its_calls_out_of_the_rollup(admin_user, alice, world):
    bobs_run = world["runs"][1]  # alpha, bob, writer, 0.05 on 03-10

    bobs_run.delete()

    assert_rollup_matches_records()
    assert not UsageDaily.objects.filter(call_count__lte=0).exists()
    report = costs.build_report(admin_user, march())
    assert report["totals"]["spent"] == D("6.60")
    assert "bob" not in {row["label"] for row in report["tables"]["by_user"]}


@pytest.mark.django_db
def test_deleting_agents_and_users_merges_their_rows_as_the_records_lose_them(
    admin_user, alice, bob, world
):
    # Two agents of one model, one day, one run: once both are gone their calls are one group.
    first = make_agent("first", model="openai/gpt-4o-mini")
    second = make_agent("second", model="openai/gpt-4o-mini")
    run = make_run(world["alpha"], bob)
    make_usage(run, first, "0.20", 100, 10, 0, at(3, 25, 1))
    make_usage(run, second, "0.30", 200, 20, 0, at(3, 25, 2))

    first.delete()
    second.delete()
    bob.delete()

    assert_rollup_matches_records()
    report = costs.build_report(admin_user, march())
    by_agent = {row["label"]: row for row in report["tables"]["by_agent"]}
    by_user = {row["label"]: row for row in report["tables"]["by_user"]}
    assert (by_agent["(no agent)"]["spent"], by_agent["(no agent)"]["calls"]) == (D("0.50"), 2)
    # bob's calls: 0.05 in r2 and the 0.50 above.
    assert (by_user["(no user)"]["spent"], by_user["(no user)"]["calls"]) == (D("0.55"), 3)
    assert report["totals"]["spent"] == D("7.15")


@pytest.mark.django_db
def test_rebuild_command_restores_the_rollup_from_the_records(alice, world):
    UsageDaily.objects.all().delete()
    UsageDaily.objects.create(day=dt.date(2025, 3, 9), model="ghost", cost=D("99"), call_count=1)
    assert costs.build_report(alice, march())["totals"]["spent"] == 0

    out = io.StringIO()
    call_command("rebuild_usage_rollup", stdout=out)

    assert "Rebuilt the usage rollup from 2025-03-03 to 2025-03-17" in out.getvalue()
    assert_rollup_matches_records()
    assert costs.build_report(alice, march())["totals"]["spent"] == D("1.65")


@pytest.mark.django_db
def test_rebuild_command_limited_to_a_range_leaves_other_days_alone(alice, world):
    UsageDaily.objects.filter(day=dt.date(2025, 3, 3)).update(cost=D("42"))
    UsageDaily.objects.filter(day=dt.date(2025, 3, 17)).update(cost=D("42"))

    call_command("rebuild_usage_rollup", start="2025-03-01", end="2025-03-10", stdout=io.StringIO())

    assert UsageDaily.objects.filter(day=dt.date(2025, 3, 3), cost=D("42")).count() == 0
    assert UsageDaily.objects.get(day=dt.date(2025, 3, 17)).cost == D("42")


# --- the reports read it ----------------------------------------------------------------------


@pytest.mark.django_db
def test_report_figures_come_from_the_rollup_not_the_records(alice, world):
    """A record written around the rollup (as raw SQL or a restore would) is not in the report
    until the rollup is rebuilt: the figures are the rollup's."""
    UsageRecord.objects.create(
        run=world["runs"][0],
        workflow=world["alpha"],
        agent=world["writer"],
        user=alice,
        model="openai/gpt-4o-mini",
        prompt_tokens=1,
        total_tokens=1,
        cost=D("10"),
        at=at(3, 4),
    )

    assert costs.build_report(alice, march())["totals"]["spent"] == D("1.65")
    call_command("rebuild_usage_rollup", start="2025-03-04", end="2025-03-04", stdout=io.StringIO())
    assert costs.build_report(alice, march())["totals"]["spent"] == D("11.65")


@pytest.mark.django_db
def test_report_reads_usage_records_only_for_the_runs_it_lists(alice, world):
    usage_table = UsageRecord._meta.db_table

    with CaptureQueriesContext(connection) as captured:
        report = costs.build_report(alice, march())

    touching = [q["sql"] for q in captured.captured_queries if usage_table in q["sql"]]
    assert report["top_runs"]
    assert len(touching) == 1
    assert '"run_id" IN' in touching[0]


@pytest.mark.django_db
def test_starter_removed_from_a_workflow_still_sees_the_runs_they_started(bob, world):
    world["alpha"].members.remove(bob)

    report = costs.build_report(bob, march())

    assert report["totals"]["spent"] == D("0.05")
    assert {row["label"] for row in report["tables"]["by_workflow"]} == {"Alpha"}
    assert [row["run_id"] for row in report["top_runs"]] == [world["runs"][1].pk]


@pytest.mark.django_db
def test_reports_page_totals_match_the_rollup_for_every_bucket(client, alice, world):
    client.force_login(alice)

    for bucket in ("day", "week", "month"):
        html = client.get("/costs/", {**MARCH, "bucket": bucket}).content.decode()
        assert 'data-total="cost">$1.65<' in html
