"""Budgets and breakers, checked before every LLM call."""

from decimal import Decimal

import pytest

from runs import engine
from runs.models import Run
from tests.factories import make_agent, make_tool, make_workflow, pipeline_spec

pytestmark = pytest.mark.integration


def start(workflow, **budget):
    run = engine.start_run(workflow.latest_version(), {"topic": "agents"}, None, budget=budget)
    return engine.wait_for(run, timeout_s=60)


def three_step(owner):
    for name in ("a", "b", "c"):
        make_agent(name, max_tokens=100)
    return make_workflow(pipeline_spec("a", "b", "c"), owner=owner)


def test_run_cost_budget_stops_the_run_with_the_figure_that_tripped(celery_worker, alice):
    run = start(three_step(alice), max_cost="0.0003")
    assert run.status == Run.BUDGET_EXCEEDED
    assert "cost budget $0.0003" in run.error
    assert run.cost <= Decimal("0.0003")
    assert run.steps.filter(status="succeeded").count() >= 1


def test_run_token_budget_stops_the_run(celery_worker, alice):
    run = start(three_step(alice), max_tokens=250)
    assert run.status == Run.BUDGET_EXCEEDED
    assert "token budget 250" in run.error
    assert run.total_tokens <= 250


def test_step_token_budget_stops_the_run(celery_worker, alice):
    run = start(three_step(alice), max_step_tokens=50)
    assert run.status == Run.BUDGET_EXCEEDED and "step token limit 50" in run.error


def test_max_steps_per_run_ends_a_loop(celery_worker, alice):
    make_tool("calculator")
    workflow = make_workflow(
        {
            "input_schema": {"type": "object"},
            "nodes": [
                {"id": "spin", "kind": "tool", "tool": "calculator", "args": {"expression": "1"}}
            ],
            "edges": [{"source": "spin", "target": "spin", "max_iterations": 50}],
        },
        owner=alice,
    )
    run = engine.wait_for(
        engine.start_run(workflow.latest_version(), {}, None, budget={"max_steps": 4})
    )
    assert run.status == Run.BUDGET_EXCEEDED and "max steps per run (4)" in run.error
    assert run.steps.count() == 4


def test_wall_clock_limit_ends_the_run(celery_worker, alice, fake_llm):
    fake_llm.latency_ms = 1200
    for name in ("a", "b"):
        make_agent(name, model=fake_llm.model(), api_base=fake_llm.base_url)
    workflow = make_workflow(pipeline_spec("a", "b"), owner=alice)
    run = start(workflow, max_wall_s=1)
    assert run.status == Run.BUDGET_EXCEEDED and "wall-clock" in run.error


def test_parallel_branches_cannot_overrun_the_budget_by_more_than_one_call(
    celery_worker, alice, fake_llm
):
    fake_llm.latency_ms = 500
    names = [f"branch{i}" for i in range(6)]
    for name in names:
        make_agent(name, model=fake_llm.model(), api_base=fake_llm.base_url, max_tokens=200)
    make_agent("joiner", model=fake_llm.model(), api_base=fake_llm.base_url, max_tokens=200)
    from django.utils import timezone

    from runs.models import ModelPrice

    ModelPrice.objects.create(
        model=fake_llm.model(),
        input_per_1m=Decimal("100"),
        output_per_1m=Decimal("100"),
        effective_from=timezone.now() - timezone.timedelta(days=1),
    )
    spec = {
        "input_schema": {"type": "object"},
        "nodes": [
            {"id": "fan", "kind": "parallel"},
            *({"id": n, "kind": "agent", "agent": n, "prompt": "Go"} for n in names),
            {"id": "join", "kind": "join", "on_branch_failure": "continue"},
            {"id": "end", "kind": "agent", "agent": "joiner", "prompt": "Sum up"},
        ],
        "edges": [
            *({"source": "fan", "target": n} for n in names),
            *({"source": n, "target": "join"} for n in names),
            {"source": "join", "target": "end"},
        ],
    }
    workflow = make_workflow(spec, owner=alice)
    # Each call is estimated at <= ~0.03 and costs ~0.01: room for about two at once.
    limit = Decimal("0.06")
    run = engine.wait_for(
        engine.start_run(workflow.latest_version(), {}, None, budget={"max_cost": str(limit)}),
        timeout_s=60,
    )
    assert run.usage.exists(), run.error
    biggest_call = max(u.cost for u in run.usage.all())
    assert run.status == Run.BUDGET_EXCEEDED
    assert run.cost <= limit + biggest_call
    assert run.usage.count() < len(names)


def test_budget_policy_ask_pauses_for_approval_and_a_raise_lets_the_run_finish(
    celery_worker, alice, admin_user
):
    from approvals.decisions import decide_approval
    from approvals.models import ApprovalRequest

    workflow = three_step(alice)
    workflow.budget_policy = "ask"
    workflow.save()
    run = start(workflow, max_cost="0.0003")
    assert run.status == Run.WAITING_APPROVAL
    request = ApprovalRequest.objects.get(run=run, kind="budget")
    assert request.payload["limit"] == "max_cost" and Decimal(request.payload["raise_by"]) > 0
    decide_approval(request.pk, admin_user, approve=True, comment="worth it")
    run = engine.wait_for(run)
    assert run.status == Run.SUCCEEDED, run.error
    assert Decimal(run.budget["max_cost"]) == Decimal("0.0003") + Decimal(
        request.payload["raise_by"]
    )


def test_budget_policy_ask_rejected_ends_the_run_over_budget(celery_worker, alice, admin_user):
    from approvals.decisions import decide_approval
    from approvals.models import ApprovalRequest

    workflow = three_step(alice)
    workflow.budget_policy = "ask"
    workflow.save()
    run = start(workflow, max_cost="0.0003")
    request = ApprovalRequest.objects.get(run=run, kind="budget")
    decide_approval(request.pk, admin_user, approve=False, comment="too pricey")
    run.refresh_from_db()
    assert run.status == Run.BUDGET_EXCEEDED and "too pricey" in run.error
