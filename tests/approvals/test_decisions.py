from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from approvals.decisions import AlreadyDecided, decide_approval, expire_due_approvals
from approvals.models import ApprovalRequest
from approvals.tasks import send_approval_emails
from runs import engine
from runs.models import Run, RunEvent, Step, ToolCall
from tests.approvals.conftest import grant_decide

pytestmark = pytest.mark.django_db


def events(run, kind):
    return list(RunEvent.objects.filter(run=run, kind=kind).order_by("seq"))


# --- opening --------------------------------------------------------------------------------


def test_open_request_creates_a_pending_request_and_logs_it_on_the_run(make_paused_run):
    before = timezone.now()
    run, step, approval = make_paused_run(due_in_s=600, default_outcome="approve")

    assert approval.status == ApprovalRequest.PENDING
    assert approval.run == run and approval.step == step
    after = timezone.now()
    assert before + timedelta(seconds=600) <= approval.due_at <= after + timedelta(seconds=600)
    assert approval.default_outcome == "approve"
    [event] = events(run, "approval.requested")
    assert event.payload["request_id"] == approval.pk
    assert event.payload["node_id"] == "gate"
    assert event.payload["url"] == f"/approvals/{approval.pk}/"


def test_approver_group_falls_back_to_the_tools_then_the_workflows(
    make_paused_run, workflow, send_email_tool
):
    legal, ops = Group.objects.create(name="legal"), Group.objects.create(name="ops")
    workflow.approver_group = ops
    workflow.save()
    _, _, node_request = make_paused_run()
    assert node_request.approver_group == ops

    send_email_tool.approver_group = legal
    send_email_tool.save()
    _, _, tool_request = make_paused_run(kind="tool_call", node_id="email")
    assert tool_request.approver_group == legal

    _, _, explicit = make_paused_run(approver_group=ops, kind="tool_call", node_id="email")
    assert explicit.approver_group == ops


def test_open_request_refuses_an_unknown_kind(make_paused_run):
    with pytest.raises(ValueError, match="unknown approval kind"):
        make_paused_run(kind="whim")


# --- who may decide -------------------------------------------------------------------------


def test_member_without_the_permission_cannot_decide(make_paused_run, deciders, bob):
    _, _, approval = make_paused_run()
    with pytest.raises(PermissionDenied):
        decide_approval(approval.pk, bob, approve=True)
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_outsider_with_the_permission_cannot_decide_a_run_they_cannot_see(
    make_paused_run, deciders, charlie
):
    _, _, approval = make_paused_run()
    with pytest.raises(PermissionDenied, match="cannot see"):
        decide_approval(approval.pk, charlie, approve=True)


def test_approver_group_narrows_who_may_decide(make_paused_run, deciders, alice, bob):
    legal = Group.objects.create(name="legal")
    _, _, approval = make_paused_run(approver_group=legal)
    with pytest.raises(PermissionDenied):
        decide_approval(approval.pk, alice, approve=True)

    grant_decide(bob)
    bob.groups.add(legal)
    decided = decide_approval(approval.pk, bob, approve=True)
    assert decided.status == ApprovalRequest.APPROVED and decided.decided_by == bob


def test_superuser_decides_any_request(make_paused_run, admin_user):
    _, _, approval = make_paused_run(approver_group=Group.objects.create(name="legal"))
    assert decide_approval(approval.pk, admin_user, approve=True).status == "approved"


# --- deciding -------------------------------------------------------------------------------


def test_approving_records_who_and_when_and_resumes_the_waiting_step(
    make_paused_run, deciders, alice
):
    run, step, approval = make_paused_run()

    decided = decide_approval(approval.pk, alice, approve=True, comment="fine")

    assert decided.status == ApprovalRequest.APPROVED
    assert decided.decided_by == alice and not decided.decided_by_system
    assert decided.decided_at is not None and decided.comment == "fine"
    step.refresh_from_db()
    run.refresh_from_db()
    assert step.status == Step.PENDING
    assert step.input["decision"] == {"approved": True, "comment": "fine", "payload": None}
    assert run.status == Run.RUNNING
    [event] = events(run, "approval.decided")
    assert event.payload["outcome"] == "approved"
    assert event.payload["by"] == "alice"
    assert event.payload["comment"] == "fine"
    assert event.payload["at"] == decided.decided_at.isoformat()


def test_rejection_needs_a_reason(make_paused_run, deciders, alice):
    _, _, approval = make_paused_run()
    with pytest.raises(ValidationError) as info:
        decide_approval(approval.pk, alice, approve=False, comment="  ")
    assert info.value.message_dict == {"comment": ["A rejection needs a reason."]}
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_rejection_passes_the_reason_to_the_run(make_paused_run, deciders, alice):
    run, step, approval = make_paused_run()

    decide_approval(approval.pk, alice, approve=False, comment="Not this week")

    step.refresh_from_db()
    assert step.input["decision"]["approved"] is False
    assert step.input["decision"]["comment"] == "Not this week"
    [event] = events(run, "approval.decided")
    assert event.payload["outcome"] == "rejected" and event.payload["status"] == "rejected"


def test_edited_tool_arguments_are_checked_against_the_tools_schema(
    make_paused_run, deciders, alice
):
    _, _, approval = make_paused_run(kind="tool_call", node_id="email")
    bad = {"tool": "send_email", "arguments": {"to": 42, "subject": "t"}}

    with pytest.raises(ValidationError) as info:
        decide_approval(approval.pk, alice, approve=True, edited_payload=bad)

    messages = info.value.message_dict["edited"]
    assert "arguments: 'body' is a required property" in messages
    assert "arguments.to: 42 is not of type 'string'" in messages
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_an_edit_cannot_swap_the_tool(make_paused_run, deciders, alice):
    _, _, approval = make_paused_run(kind="tool_call", node_id="email")
    edited = {"tool": "publish_report", "arguments": approval.payload["arguments"]}
    with pytest.raises(ValidationError, match="Only `arguments` may be edited"):
        decide_approval(approval.pk, alice, approve=True, edited_payload=edited)


def test_edit_then_approve_keeps_the_diff_and_hands_the_edit_to_the_run(
    make_paused_run, deciders, alice
):
    run, step, approval = make_paused_run(kind="tool_call", node_id="email")
    arguments = {**approval.payload["arguments"], "to": "boss@example.com"}
    edited = {"tool": "send_email", "arguments": arguments}

    decided = decide_approval(approval.pk, alice, approve=True, edited_payload=edited)

    assert decided.edited_payload == edited
    assert decided.payload["arguments"]["to"] == "team@example.com"  # the original is kept
    call = ToolCall.objects.get(step=step)
    assert call.status == ToolCall.APPROVED and call.approved_arguments == arguments
    [event] = events(run, "approval.decided")
    assert event.payload["edited"] is True
    assert event.payload["diff"] == [
        {
            "path": "arguments.to",
            "change": "changed",
            "old": "team@example.com",
            "new": "boss@example.com",
        }
    ]


def test_an_unchanged_edit_is_a_plain_approval(make_paused_run, deciders, alice):
    _, _, approval = make_paused_run(kind="tool_call", node_id="email")
    decided = decide_approval(approval.pk, alice, approve=True, edited_payload=approval.payload)
    assert decided.edited_payload is None


def test_second_decision_says_who_decided_first_and_when(
    make_paused_run, deciders, alice, admin_user
):
    _, _, approval = make_paused_run()
    first = decide_approval(approval.pk, alice, approve=True)

    with pytest.raises(AlreadyDecided) as info:
        decide_approval(approval.pk, admin_user, approve=False, comment="no")

    when = timezone.localtime(first.decided_at).strftime("%Y-%m-%d %H:%M:%S")
    assert str(info.value).startswith(f"Already approved by alice at {when}")
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.APPROVED
    assert len(events(approval.run, "approval.decided")) == 1


def test_budget_request_is_decided_the_same_way_and_raises_the_budget(
    make_paused_run, deciders, alice
):
    run, _, approval = make_paused_run(
        kind="budget",
        node_id="gate",
        payload={"limit": "max_cost", "raise_by": "0.50", "message": "cost 0.50 reached"},
    )
    with pytest.raises(ValidationError, match="raise_by: must be more than 0"):
        decide_approval(
            approval.pk, alice, approve=True, edited_payload={**approval.payload, "raise_by": "-1"}
        )

    decide_approval(
        approval.pk, alice, approve=True, edited_payload={**approval.payload, "raise_by": "0.75"}
    )

    run.refresh_from_db()
    assert Decimal(run.budget["max_cost"]) == Decimal("1.25")
    [event] = events(run, "approval.decided")
    assert event.payload["diff"][0]["new"] == "0.75"


def test_only_staff_let_a_run_go_past_the_global_cap(make_paused_run, deciders, alice):
    run, _, approval = make_paused_run(
        kind="budget",
        node_id="gate",
        payload={
            "limit": "spend_cap",
            "cap": "global_monthly",
            "raise_by": "2.00",
            "message": "global monthly cap $10.00 would be exceeded",
        },
    )
    with pytest.raises(PermissionDenied):
        decide_approval(approval.pk, alice, approve=True)

    alice.is_staff = True
    alice.save(update_fields=["is_staff"])
    decide_approval(approval.pk, alice, approve=True)

    run.refresh_from_db()
    assert run.budget["cap_allowance"] == {"global_monthly": "2.00"}


def test_deciding_on_a_run_that_ended_cancels_the_request(make_paused_run, deciders, alice):
    run, _, approval = make_paused_run()
    engine.cancel_run(run, alice)

    with pytest.raises(AlreadyDecided, match="Already cancelled by the system"):
        decide_approval(approval.pk, alice, approve=True)

    [event] = events(run, "approval.decided")
    assert event.payload["outcome"] == "cancelled"


# --- deadlines ------------------------------------------------------------------------------


def test_expiry_applies_the_default_outcome_as_the_system(make_paused_run):
    run, step, approval = make_paused_run(due_in_s=60, default_outcome="reject")
    _, _, later = make_paused_run(due_in_s=3600)

    assert expire_due_approvals(now=timezone.now() + timedelta(seconds=61)) == 1

    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.EXPIRED
    assert approval.decided_by is None and approval.decided_by_system
    assert "default outcome 'reject' applied" in approval.comment
    step.refresh_from_db()
    assert step.status == Step.PENDING and step.input["decision"]["approved"] is False
    [event] = events(run, "approval.decided")
    assert event.payload["by"] == "the system" and event.payload["outcome"] == "rejected"
    later.refresh_from_db()
    assert later.status == ApprovalRequest.PENDING


def test_expiry_with_default_approve_lets_the_run_continue(make_paused_run):
    _, step, approval = make_paused_run(due_in_s=1, default_outcome="approve")

    expire_due_approvals(now=timezone.now() + timedelta(seconds=2))

    step.refresh_from_db()
    assert step.input["decision"]["approved"] is True
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.EXPIRED


def test_a_human_after_the_deadline_hears_it_expired(make_paused_run, deciders, alice):
    _, _, approval = make_paused_run(due_in_s=1)
    expire_due_approvals(now=timezone.now() + timedelta(seconds=2))
    with pytest.raises(AlreadyDecided, match="Already expired by the system"):
        decide_approval(approval.pk, alice, approve=True)


# --- notifications --------------------------------------------------------------------------


def test_approvers_are_emailed_a_link_and_nobody_else(make_paused_run, deciders, admin_user):
    _, _, approval = make_paused_run(due_in_s=600)

    sent = send_approval_emails(approval.pk)

    # alice (permission, owner) and admin (superuser); not bob (no permission), not charlie
    # (permission, but cannot see the run).
    assert sent == 2
    assert sorted(m.to[0] for m in mail.outbox) == ["admin@example.com", "alice@example.com"]
    assert f"/approvals/{approval.pk}/" in mail.outbox[0].body
    assert "Approval needed" in mail.outbox[0].subject


def test_no_email_once_the_request_is_decided(make_paused_run, deciders, alice):
    _, _, approval = make_paused_run()
    decide_approval(approval.pk, alice, approve=True)
    assert send_approval_emails(approval.pk) == 0
