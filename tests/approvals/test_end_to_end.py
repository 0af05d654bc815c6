"""Decisions against the real engine on a real Celery worker."""

import time

import pytest
from django.core.management import call_command

from approvals.decisions import AlreadyDecided, decide_approval, expire_due_approvals
from approvals.models import ApprovalRequest
from runs import engine
from runs.models import Run, RunEvent, Step
from teams.models import OutboxMessage, Workflow
from tests.approvals.conftest import grant_decide
from tests.factories import make_tool, make_workflow

pytestmark = pytest.mark.integration


def sent_emails(run: Run):
    return OutboxMessage.objects.filter(
        tool="send_email", idempotency_key__startswith=f"run{run.pk}-"
    )


def waiting_request(run: Run) -> ApprovalRequest:
    run = engine.wait_for(run, timeout_s=60)
    assert run.status == Run.WAITING_APPROVAL, (run.status, run.error)
    return ApprovalRequest.objects.get(run=run, status=ApprovalRequest.PENDING)


@pytest.fixture
def demo_approval(celery_worker, alice):
    call_command("load_demo", verbosity=0)
    workflow = Workflow.objects.get(slug="demo-approval")
    workflow.owner = alice
    workflow.save(update_fields=["owner"])
    grant_decide(alice)
    return workflow


def test_demo_approval_waits_and_one_approval_sends_the_email_once(
    demo_approval, alice, admin_user
):
    run = engine.start_run(demo_approval.latest_version(), {"topic": "durable agents"}, alice)
    approval = waiting_request(run)
    assert approval.kind == "tool_call"
    assert approval.payload["tool"] == "send_email"
    assert approval.payload["arguments"]["to"] == "team@example.com"
    assert not sent_emails(run).exists()  # nothing is sent before a human says so

    decide_approval(approval.pk, alice, approve=True, comment="Go")
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert sent_emails(run).count() == 1
    with pytest.raises(AlreadyDecided, match="Already approved by alice"):
        decide_approval(approval.pk, admin_user, approve=True)
    assert RunEvent.objects.filter(run=run, kind="step.resumed").count() == 1
    assert sent_emails(run).count() == 1
    kinds = list(RunEvent.objects.filter(run=run).values_list("kind", flat=True))
    assert kinds.index("approval.requested") < kinds.index("approval.decided")


def test_an_edited_tool_call_runs_with_the_edited_arguments(demo_approval, alice):
    run = engine.start_run(demo_approval.latest_version(), {"topic": "costs"}, alice)
    approval = waiting_request(run)
    arguments = {**approval.payload["arguments"], "to": "boss@example.com"}

    decide_approval(
        approval.pk,
        alice,
        approve=True,
        edited_payload={**approval.payload, "arguments": arguments},
    )
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    [email] = sent_emails(run)
    assert email.payload["to"] == "boss@example.com"


def test_rejecting_the_email_fails_the_run_with_the_reason(demo_approval, alice):
    run = engine.start_run(demo_approval.latest_version(), {"topic": "risks"}, alice)
    approval = waiting_request(run)

    decide_approval(approval.pk, alice, approve=False, comment="Not before the review")
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.FAILED
    assert "Not before the review" in run.error
    assert not sent_emails(run).exists()
    assert not run.steps.filter(node_id="publish").exists()


GATE_WITH_REJECTION_EDGE = {
    "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}}},
    "nodes": [
        {"id": "gate", "kind": "approval", "title": "Publish {topic}?", "prompt": "Publish?"},
        {
            "id": "publish",
            "kind": "tool",
            "tool": "publish_report",
            "args": {"title": "{topic}", "body": "The body"},
        },
        {"id": "note", "kind": "tool", "tool": "word_count", "args": {"text": "not published"}},
    ],
    "edges": [
        {"source": "gate", "target": "publish"},
        {"source": "gate", "target": "note", "on": "rejected"},
    ],
}


@pytest.fixture
def gated(celery_worker, alice):
    make_tool(
        "publish_report",
        entrypoint="baton.publish_report",
        side_effect=True,
        args_schema={
            "type": "object",
            "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
        },
    )
    make_tool(
        "word_count",
        entrypoint="baton.word_count",
        args_schema={"type": "object", "properties": {"text": {"type": "string"}}},
    )
    grant_decide(alice)

    def make(**gate) -> Workflow:
        spec = {
            **GATE_WITH_REJECTION_EDGE,
            "nodes": [
                {**GATE_WITH_REJECTION_EDGE["nodes"][0], **gate},
                *GATE_WITH_REJECTION_EDGE["nodes"][1:],
            ],
        }
        return make_workflow(spec, owner=alice, slug=f"gated-{len(gate)}-{time.monotonic_ns()}")

    return make


def test_rejecting_an_approval_node_takes_its_rejection_edge(gated, alice):
    run = engine.start_run(gated().latest_version(), {"topic": "t"}, alice)
    approval = waiting_request(run)
    assert approval.kind == "node"

    decide_approval(approval.pk, alice, approve=False, comment="Too early")
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.get(node_id="note").status == Step.SUCCEEDED
    assert not run.steps.filter(node_id="publish").exists()


def test_approving_an_approval_node_continues_exactly_once(gated, alice):
    run = engine.start_run(gated().latest_version(), {"topic": "t"}, alice)
    approval = waiting_request(run)

    decide_approval(approval.pk, alice, approve=True)
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.filter(node_id="publish").count() == 1
    assert (
        OutboxMessage.objects.filter(
            tool="publish_report", idempotency_key__startswith=f"run{run.pk}-"
        ).count()
        == 1
    )


def test_a_request_past_its_deadline_gets_the_default_outcome_and_the_run_reacts(gated, alice):
    run = engine.start_run(
        gated(due_in_s=1, default_outcome="approve").latest_version(), {"topic": "t"}, alice
    )
    approval = waiting_request(run)
    time.sleep(1.1)

    assert expire_due_approvals() == 1
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.get(node_id="publish").status == Step.SUCCEEDED
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.EXPIRED and approval.decided_by_system
