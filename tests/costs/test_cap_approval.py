"""Spend caps under the "ask" policy: a call that would break a workflow's daily or monthly cap,
or the global monthly cap, pauses the run with a budget approval; approving lets that run go past
the cap by the approved amount, rejecting ends it over budget. The "stop" policy is in
test_cap_enforcement.py.

The daily-cap and parallel-branch tests run on a real Celery worker; the monthly and global ones
run the steps in this process (the global cap is a setting the `settings` fixture overrides, which
a worker process would not see), inside the test's transaction so nothing is queued for a worker.
"""

import datetime as dt
import time
from decimal import Decimal as D

import pytest
from django.db.models import Sum
from django.test import Client
from django.utils import timezone

from approvals.decisions import decide_approval
from approvals.models import ApprovalRequest
from runs import costs, engine
from runs.models import ModelPrice, Run, Step, UsageDaily, UsageRecord
from tests.costs.usage import make_usage
from tests.factories import make_agent, make_workflow, pipeline_spec


def spent_today(workflow=None) -> D:
    rows = UsageDaily.objects.filter(day=dt.datetime.now(dt.UTC).date())
    if workflow is not None:
        rows = rows.filter(workflow=workflow)
    return costs.as_decimal(rows.aggregate(s=Sum("cost"))["s"])


def spent_this_month(workflow=None) -> D:
    today = dt.datetime.now(dt.UTC).date()
    rows = UsageDaily.objects.filter(day__gte=today.replace(day=1))
    if workflow is not None:
        rows = rows.filter(workflow=workflow)
    return costs.as_decimal(rows.aggregate(s=Sum("cost"))["s"])


def biggest_call(run: Run) -> D:
    return max(record.cost for record in UsageRecord.objects.filter(run=run))


def run_inline(run: Run, limit: int = 20) -> Run:
    """Execute the run's pending steps here, one after another, until none is left."""
    for _ in range(limit):
        step = run.steps.filter(status=Step.PENDING).order_by("id").first()
        if step is None:
            break
        engine.execute_step(step.pk)
    run.refresh_from_db()
    return run


def capped_pipeline(owner, slug: str = "capped", **caps):
    writer = make_agent("writer")
    make_agent("editor")
    workflow = make_workflow(
        pipeline_spec("writer", "editor"), owner=owner, slug=slug, budget_policy="ask", **caps
    )
    return workflow, writer


def fill_up_to(run: Run, agent, cap: D, spent: D) -> None:
    """Record usage today so that less than one more call's estimate is left under `cap`."""
    make_usage(run, agent, str(cap - spent - D("0.00000001")))


# --- a workflow's daily cap, on a real worker ---------------------------------------------------


@pytest.mark.integration
def test_daily_cap_ask_pauses_the_run_and_an_approved_raise_lets_it_finish_past_the_cap(
    celery_worker, alice, admin_user
):
    cap = D("5.00")
    workflow, writer = capped_pipeline(alice, daily_cost_cap=cap)
    earlier = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    assert earlier.status == Run.SUCCEEDED, earlier.error
    fill_up_to(earlier, writer, cap, spent_today(workflow))

    run = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))

    assert run.status == Run.WAITING_APPROVAL, run.error
    assert run.steps.get(node_id="writer").status == Step.WAITING
    request = ApprovalRequest.objects.get(run=run, kind="budget", status="pending")
    payload = request.payload
    assert request.title == f"Let run {run.pk} go past the workflow capped daily cap?"
    assert payload["limit"] == "spend_cap" and payload["cap"] == "workflow_daily"
    assert D(payload["cap_amount"]) == cap and D(payload["allowance"]) == 0
    assert D(payload["spent"]) == cap - D("0.00000001")
    assert D(payload["estimate"]) > 0
    raise_by = D(payload["raise_by"])
    assert raise_by >= D(payload["spent"]) + D(payload["estimate"]) - cap
    assert payload["message"].startswith(
        "workflow capped daily cap $5.00 would be exceeded: $5.00 spent today + $"
    )
    assert not UsageRecord.objects.filter(run=run).exists()

    decide_approval(request.pk, admin_user, approve=True, comment="worth it")
    run = engine.wait_for(run)

    assert run.status == Run.SUCCEEDED, run.error
    assert costs.cap_allowances(run.budget) == {"workflow_daily": raise_by}
    assert workflow.daily_cost_cap == cap  # the cap itself is untouched
    assert cap < spent_today(workflow) <= cap + raise_by + biggest_call(run)
    # Only the approved run may go past the cap: the next one is stopped again.
    other = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    assert other.status == Run.WAITING_APPROVAL


@pytest.mark.integration
def test_daily_cap_ask_rejected_ends_the_run_over_budget_with_the_reason(
    celery_worker, alice, admin_user
):
    cap = D("5.00")
    workflow, writer = capped_pipeline(alice, daily_cost_cap=cap)
    earlier = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    fill_up_to(earlier, writer, cap, spent_today(workflow))
    run = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    request = ApprovalRequest.objects.get(run=run, kind="budget")

    decide_approval(request.pk, admin_user, approve=False, comment="too pricey")

    run.refresh_from_db()
    assert run.status == Run.BUDGET_EXCEEDED
    assert run.error.startswith("workflow capped daily cap $5.00 would be exceeded: ")
    assert run.error.endswith("; going past the cap rejected: too pricey")
    assert not UsageRecord.objects.filter(run=run).exists()
    assert "cap_allowance" not in run.budget
    assert spent_today(workflow) < cap


@pytest.mark.integration
def test_parallel_branches_overrun_a_cap_by_at_most_one_call_beyond_the_approved_allowance(
    celery_worker, alice, admin_user, fake_llm
):
    fake_llm.latency_ms = 300
    names = [f"branch{i}" for i in range(6)]
    for name in [*names, "joiner"]:
        make_agent(name, model=fake_llm.model(), api_base=fake_llm.base_url, max_tokens=200)
    ModelPrice.objects.create(
        model=fake_llm.model(),
        input_per_1m=D("100"),
        output_per_1m=D("100"),
        effective_from=timezone.now() - dt.timedelta(days=1),
    )
    spec = {
        "input_schema": {"type": "object"},
        "nodes": [
            {"id": "fan", "kind": "parallel"},
            *({"id": n, "kind": "agent", "agent": n, "prompt": "Go"} for n in names),
            {"id": "join", "kind": "join"},
            {"id": "end", "kind": "agent", "agent": "joiner", "prompt": "Sum up"},
        ],
        "edges": [
            *({"source": "fan", "target": n} for n in names),
            *({"source": n, "target": "join"} for n in names),
            {"source": "join", "target": "end"},
        ],
    }
    # Each call is estimated at ~0.02 and costs ~0.01: the cap has room for about two calls
    # at once, and each approval for about one more. Requests are approved the moment they
    # appear, so a decision never finds its step not yet waiting.
    cap, raise_by = D("0.06"), D("0.02")
    workflow = make_workflow(spec, owner=alice, daily_cost_cap=cap, budget_policy="ask")
    run = engine.start_run(workflow.latest_version(), {}, alice)

    approvals = 0
    deadline = time.monotonic() + 120
    while run.status not in Run.TERMINAL:
        assert time.monotonic() < deadline, f"run still {run.status}"
        for request in ApprovalRequest.objects.filter(run=run, kind="budget", status="pending"):
            edited = {**request.payload, "raise_by": str(raise_by)}
            decide_approval(request.pk, admin_user, approve=True, edited_payload=edited)
            approvals += 1
        time.sleep(0.2)
        run.refresh_from_db()

    assert run.status == Run.SUCCEEDED, run.error
    assert approvals >= 1
    allowance = costs.cap_allowances(run.budget)["workflow_daily"]
    assert allowance == approvals * raise_by
    assert cap < spent_today(workflow) <= cap + allowance + biggest_call(run)


# --- a workflow's monthly cap and the global cap, in this process -------------------------------


@pytest.mark.django_db
def test_monthly_cap_ask_pauses_and_an_approved_raise_lets_the_run_finish(alice, admin_user):
    cap = D("20.00")
    workflow, writer = capped_pipeline(alice, monthly_cost_cap=cap)
    earlier = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    assert earlier.status == Run.SUCCEEDED, earlier.error
    fill_up_to(earlier, writer, cap, spent_this_month(workflow))

    run = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))

    assert run.status == Run.WAITING_APPROVAL, run.error
    request = ApprovalRequest.objects.get(run=run, kind="budget", status="pending")
    assert request.payload["cap"] == "workflow_monthly"
    assert request.payload["period"] == f"{timezone.now().astimezone(dt.UTC):%Y-%m}"
    assert request.payload["message"].startswith(
        "workflow capped monthly cap $20.00 would be exceeded: $20.00 spent this month + $"
    )
    raise_by = D(request.payload["raise_by"])

    decide_approval(request.pk, admin_user, approve=True, comment="month end report")
    run = run_inline(run)

    assert run.status == Run.SUCCEEDED, run.error
    assert costs.cap_allowances(run.budget) == {"workflow_monthly": raise_by}
    assert cap < spent_this_month(workflow) <= cap + raise_by + biggest_call(run)


@pytest.mark.django_db
def test_global_cap_ask_pauses_and_an_approved_raise_lets_only_that_run_past_it(
    settings, alice, bob, admin_user
):
    cap = D("50.00")
    settings.BATON_GLOBAL_MONTHLY_CAP = cap
    workflow, writer = capped_pipeline(alice)
    others = make_workflow(pipeline_spec("writer"), owner=bob, slug="others")
    busy = run_inline(engine.start_run(others.latest_version(), {"topic": "x"}, bob))
    assert busy.status == Run.SUCCEEDED, busy.error
    fill_up_to(busy, writer, cap, spent_this_month())  # spent by another team's workflow

    run = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))

    assert run.status == Run.WAITING_APPROVAL, run.error
    request = ApprovalRequest.objects.get(run=run, kind="budget", status="pending")
    assert request.payload["cap"] == "global_monthly"
    assert request.title == f"Let run {run.pk} go past the global monthly cap?"
    raise_by = D(request.payload["raise_by"])

    decide_approval(request.pk, admin_user, approve=True, comment="ok")
    run = run_inline(run)

    assert run.status == Run.SUCCEEDED, run.error
    assert costs.cap_allowances(run.budget) == {"global_monthly": raise_by}
    assert cap < spent_this_month() <= cap + raise_by + biggest_call(run)
    other = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    assert other.status == Run.WAITING_APPROVAL


@pytest.mark.django_db
def test_global_cap_with_the_stop_policy_still_stops_the_run(settings, alice, bob):
    cap = D("50.00")
    settings.BATON_GLOBAL_MONTHLY_CAP = cap
    workflow, writer = capped_pipeline(alice)
    workflow.budget_policy = "stop"
    workflow.save()
    others = make_workflow(pipeline_spec("writer"), owner=bob, slug="others")
    busy = run_inline(engine.start_run(others.latest_version(), {"topic": "x"}, bob))
    fill_up_to(busy, writer, cap, spent_this_month())

    run = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))

    assert run.status == Run.BUDGET_EXCEEDED
    assert run.error.startswith("global monthly cap $50.00 would be exceeded: $50.00 spent")
    assert not ApprovalRequest.objects.filter(run=run).exists()
    assert not UsageRecord.objects.filter(run=run).exists()


# --- what the approver and the run page show ----------------------------------------------------


@pytest.mark.django_db
def test_cap_request_page_shows_the_cap_the_spend_and_the_suggested_raise(alice, admin_user):
    cap = D("5.00")
    workflow, writer = capped_pipeline(alice, daily_cost_cap=cap)
    earlier = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    fill_up_to(earlier, writer, cap, spent_today(workflow))
    run = run_inline(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    request = ApprovalRequest.objects.get(run=run, kind="budget")
    raise_by = D(request.payload["raise_by"])
    client = Client()
    client.force_login(admin_user)

    page = client.get(f"/approvals/{request.pk}/").content.decode()

    figures = page[page.index(f'id="approval-{request.pk}-figures"') :]
    figures = figures[: figures.index("</table>")]
    expected = [
        ("Cap", f"workflow capped daily cap, period {timezone.now():%Y-%m-%d} (UTC)"),
        ("Cap amount", "$5.00"),
        ("Spent today", "$5.00"),
        ("Reserved for calls in flight", "$0.00"),
        ("Already approved for this run past the cap", "$0.00"),
        ("Suggested raise", costs.money(raise_by)),
        ("This run's limit on this cap once approved", costs.money(cap + raise_by)),
    ]
    for label, value in expected:
        row = f'<th scope="row">{label}</th><td class="num">{value}</td>'
        assert row.replace("'", "&#x27;") in figures, label
    assert request.payload["message"] in page

    decide_approval(request.pk, admin_user, approve=True, comment="ok")
    breakdown = client.get(f"/costs/runs/{run.pk}/breakdown/").content.decode()
    assert f"workflow daily cap +{costs.money(raise_by)}" in breakdown
