import datetime as dt
import io
from decimal import Decimal as D

import pytest
from django.contrib import admin
from django.contrib.messages.storage.fallback import FallbackStorage
from django.core.management import call_command
from django.db.models import Min, Sum
from django.utils import timezone

from runs import costs
from runs.models import ModelPrice, Run, Step, UsageRecord
from tests.costs.usage import assert_rollup_matches_records, at, make_run, make_usage
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def team():
    return make_agent("writer", model="openai/gpt-4o-mini"), make_agent(
        "critic", model="anthropic/claude-3-5-sonnet"
    )


def make_step(run: Run, node_id: str, agent) -> Step:
    return Step.objects.create(run=run, node_id=node_id, kind="agent", agent=agent)


def test_breakdown_per_step_and_agent_with_budget_share(alice, team):
    writer, critic = team
    workflow = make_workflow(pipeline_spec("writer", "critic"), owner=alice)
    run = make_run(workflow, alice, budget={"max_cost": "1.00", "max_tokens": 10000})
    draft, review = make_step(run, "draft", writer), make_step(run, "review", critic)
    make_usage(run, writer, "0.10", 1000, 200, 100, at(3, 3), step=draft, call_index=0)
    make_usage(
        run, writer, "0.05", 500, 100, 0, at(3, 3), step=draft, call_index=1, model="openai/gpt-4o"
    )
    make_usage(run, critic, "0.25", 2000, 300, 0, at(3, 3), step=review)

    breakdown = costs.run_breakdown(run)

    assert [
        (
            row["label"],
            row["agent"],
            row["models"],
            row["spent"],
            row["tokens"],
            row["calls"],
            row["share_pct"],
        )
        for row in breakdown["steps"]
    ] == [
        (
            "draft#0",
            "writer",
            ["openai/gpt-4o", "openai/gpt-4o-mini"],
            D("0.15"),
            1800,
            2,
            D("37.5"),
        ),
        ("review#0", "critic", ["anthropic/claude-3-5-sonnet"], D("0.25"), 2300, 1, D("62.5")),
    ]
    assert [
        (row["label"], row["spent"], row["prompt"], row["cached"]) for row in breakdown["agents"]
    ] == [("critic", D("0.25"), 2000, 0), ("writer", D("0.15"), 1500, 100)]
    assert breakdown["totals"]["spent"] == D("0.40")
    assert breakdown["cost_share_pct"] == D("40.0")
    assert breakdown["token_share_pct"] == D("41.0")


def test_breakdown_without_budget_or_calls(alice):
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    run = make_run(workflow, alice, budget={"max_cost": None})

    breakdown = costs.run_breakdown(run)

    assert breakdown["steps"] == [] and breakdown["totals"]["spent"] == D(0)
    assert breakdown["cost_share_pct"] is None and breakdown["max_cost"] is None


def test_breakdown_fragment_renders_budget_and_rows(client, alice, team):
    writer, _ = team
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    run = make_run(workflow, alice, status=Run.RUNNING, budget={"max_cost": "0.50"})
    make_usage(run, writer, "0.20", 100, 10, 0, at(3, 3), step=make_step(run, "draft", writer))
    client.force_login(alice)

    html = client.get(f"/costs/runs/{run.pk}/breakdown/").content.decode()

    assert "40.0% of the $0.50 run budget" in html
    assert "draft#0" in html and 'id="run-cost-agents"' in html
    # Still running: the fragment refreshes itself.
    assert 'hx-trigger="every 5s"' in html


def test_subworkflow_runs_are_listed_apart(alice, team):
    writer, _ = team
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    parent = make_run(workflow, alice)
    child = make_run(workflow, alice, parent=parent)
    make_usage(parent, writer, "0.10", 10, 1)
    make_usage(child, writer, "0.30", 30, 3)

    breakdown = costs.run_breakdown(parent)

    assert breakdown["totals"]["spent"] == D("0.10")
    assert [(row["run_id"], row["spent"]) for row in breakdown["child_runs"]] == [
        (child.pk, D("0.30"))
    ]


def test_recompute_action_reprices_usage_and_run_totals_from_the_price_date(
    rf, admin_user, alice, team
):
    writer, _ = team
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    run = make_run(workflow, alice, cost=D("9"))
    step = make_step(run, "draft", writer)
    before = make_usage(run, writer, "0.50", 1_000_000, 0, 0, at(2, 20), step=step)
    after = make_usage(
        run, writer, "0.50", 1_000_000, 1_000_000, 0, at(3, 5), step=step, call_index=1
    )
    price = ModelPrice.objects.create(
        model="openai/gpt-4o-mini",
        input_per_1m=D("1"),
        output_per_1m=D("2"),
        effective_from=at(3, 1, 0),
    )
    request = rf.post("/admin/runs/modelprice/")
    request.user = admin_user
    request.session = {}
    request._messages = FallbackStorage(request)
    model_admin = admin.site._registry[ModelPrice]

    costs.recompute_action(model_admin, request, ModelPrice.objects.filter(pk=price.pk))

    before.refresh_from_db()
    after.refresh_from_db()
    run.refresh_from_db()
    assert before.cost == D("0.50")  # before the price's date: untouched
    assert after.cost == D("3.00") and after.price == price
    assert run.cost == D("3.50")
    assert Step.objects.get(pk=step.pk).cost == D("3.50")
    assert "Recomputed 1 usage record(s) of 1 model(s)" in str(list(request._messages)[0])


def test_usage_fixture_command_makes_consistent_runs_and_clears_them(alice):
    call_command(
        "make_usage_fixture",
        records=300,
        runs=40,
        days=10,
        workflows=3,
        agents=4,
        users=5,
        stdout=io.StringIO(),
    )
    fixture_runs = Run.objects.filter(workflow__slug__startswith="fixture-")

    assert UsageRecord.objects.count() == 300
    assert fixture_runs.count() == 40
    assert (
        fixture_runs.aggregate(s=Sum("cost"))["s"]
        == UsageRecord.objects.aggregate(s=Sum("cost"))["s"]
    )
    # Spread over the days asked for, not all stamped "now".
    oldest = fixture_runs.aggregate(m=Min("created_at"))["m"]
    assert timezone.now() - dt.timedelta(days=10) <= oldest < timezone.now() - dt.timedelta(days=1)
    # The reports' rollup covers the bulk-inserted records.
    assert_rollup_matches_records()

    call_command(
        "make_usage_fixture",
        records=50,
        runs=5,
        clear=True,
        workflows=2,
        agents=2,
        users=2,
        stdout=io.StringIO(),
    )
    assert UsageRecord.objects.count() == 50
    assert Run.objects.filter(workflow__slug__startswith="fixture-").count() == 5
    assert_rollup_matches_records()
