"""Runs paused on a human, made the way the engine makes them: a waiting step, then
`runs.hooks.request_approval` (which is `approvals.requests.open_request`)."""

import pytest
from django.contrib.auth.models import Permission
from django.db import transaction

from runs import hooks
from runs.models import Run, Step, ToolCall
from tests.factories import make_tool, make_workflow

EMAIL_SCHEMA = {
    "type": "object",
    "properties": {
        "to": {"type": "string"},
        "subject": {"type": "string"},
        "body": {"type": "string"},
    },
    "required": ["to", "subject", "body"],
    "additionalProperties": False,
}

GATE_SPEC = {
    "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}}},
    "nodes": [
        {"id": "gate", "kind": "approval", "title": "Go ahead?", "prompt": "Publish {topic}?"},
        {
            "id": "email",
            "kind": "tool",
            "tool": "send_email",
            "args": {"to": "team@example.com", "subject": "{topic}", "body": "Hello"},
        },
    ],
    "edges": [{"source": "gate", "target": "email"}],
}


def grant_decide(*users) -> None:
    perm = Permission.objects.get(
        content_type__app_label="approvals", codename="decide_approvalrequest"
    )
    for user in users:
        user.user_permissions.add(perm)


@pytest.fixture
def send_email_tool(db):
    return make_tool(
        "send_email",
        entrypoint="baton.send_email",
        args_schema=EMAIL_SCHEMA,
        side_effect=True,
        requires_approval=True,
    )


@pytest.fixture
def workflow(db, alice, bob, send_email_tool):
    """Alice owns it, bob is a member; charlie is an outsider."""
    return make_workflow(GATE_SPEC, owner=alice, members=[bob], slug="gated")


@pytest.fixture
def deciders(alice, bob, charlie):
    """Alice may decide; bob sees but may not; charlie may decide in general but sees nothing."""
    grant_decide(alice, charlie)
    return alice


def paused_run(workflow, user, *, node_id: str = "gate", kind: str = "node", **request) -> tuple:
    """A run waiting on a human at `node_id`, with its open request: (run, step, approval)."""
    with transaction.atomic():
        run = Run.objects.create(
            workflow=workflow,
            version=workflow.latest_version(),
            input={"topic": "t"},
            started_by=user,
            status=Run.WAITING_APPROVAL,
            blocked_on="approval",
            budget={"max_cost": "0.50", "policy": "ask"},
        )
        step = Step.objects.create(
            run=run,
            node_id=node_id,
            kind="approval" if kind == "node" else "tool",
            status=Step.WAITING,
            input={"approval_open": True},
        )
        tool_call = None
        payload = request.pop("payload", {"prompt": "Publish t?"})
        if kind == "tool_call":
            payload = request.pop("tool_payload", None) or {
                "tool": "send_email",
                "arguments": {"to": "team@example.com", "subject": "t", "body": "Hello"},
            }
            tool_call = ToolCall.objects.create(
                step=step,
                call_index=0,
                # The engine's own key, so a worker that executes the resumed step finds
                # this call instead of making another (runs/context.py call_tool).
                idempotency_key=f"run{run.pk}-step{step.pk}-e{step.epoch}-call0",
                tool=payload["tool"],
                arguments=payload["arguments"],
                status=ToolCall.AWAITING_APPROVAL,
            )
        approval = hooks.request_approval(
            run=run,
            step=step,
            kind=kind,
            title=request.pop("title", f"Approve {node_id}"),
            payload=payload,
            context=request.pop("context", {"previous_outputs": []}),
            tool_call=tool_call,
            **request,
        )
    return run, step, approval


@pytest.fixture
def make_paused_run(workflow, alice):
    def make(**kwargs):
        return paused_run(kwargs.pop("workflow", workflow), kwargs.pop("user", alice), **kwargs)

    return make
