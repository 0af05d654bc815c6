"""Opening approval requests, and the inbox fragments that announce them.

The engine asks through `runs.hooks.request_approval`, which calls `open_request` (registered
by ApprovalsConfig.ready). Every inbox and navigation badge listens on
`runs.events.APPROVALS_GROUP`; the group carries only "request N was opened / decided" and each
consumer renders what its user may see (approvals/consumers.py).
"""

import json
from datetime import timedelta

from django.contrib.auth.models import Group
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import format_html

from approvals.models import ApprovalRequest
from runs.costs import cap_request_figures
from runs.events import APPROVALS_GROUP, append_event, publish_to_group
from teams.models import Tool

KIND_CODES = {code for code, _ in ApprovalRequest.KINDS}
OUTCOMES = {code for code, _ in ApprovalRequest.OUTCOMES}

# The part of a payload a human may edit before approving, per kind.
EDITABLE_KEYS = {
    "tool_call": "arguments",
    "node": "output",
    "escalation": "output",
    "budget": "raise_by",
}


def open_request(
    *,
    run,
    step,
    kind: str,
    title: str,
    payload: dict,
    context: dict,
    tool_call=None,
    due_in_s: int | None = None,
    default_outcome: str = "reject",
    approver_group: Group | None = None,
) -> ApprovalRequest:
    """Create a pending request, log `approval.requested` on the run and, once the engine's
    transaction commits, show it in every inbox and email the people who may decide it.

    `approver_group` falls back to the tool's, then the workflow's approver group.
    """
    from approvals.tasks import notify_approvers  # tasks -> decisions -> this module

    if kind not in KIND_CODES:
        raise ValueError(f"unknown approval kind {kind!r}")
    if default_outcome not in OUTCOMES:
        raise ValueError(f"default_outcome must be 'approve' or 'reject', not {default_outcome!r}")
    if approver_group is None:
        approver_group = _tool_group(payload, tool_call) or run.workflow.approver_group
    now = timezone.now()
    with transaction.atomic():
        approval = ApprovalRequest.objects.create(
            run=run,
            step=step,
            tool_call=tool_call,
            kind=kind,
            title=(title or kind)[:300],
            payload=payload or {},
            context=context or {},
            due_at=now + timedelta(seconds=due_in_s) if due_in_s else None,
            default_outcome=default_outcome,
            approver_group=approver_group,
        )
        append_event(run.pk, "approval.requested", requested_event_payload(approval))
        transaction.on_commit(lambda: publish_change(approval.pk, "requested"), robust=True)
        notify_approvers.delay_on_commit(approval.pk)
    return approval


def _tool_group(payload: dict, tool_call) -> Group | None:
    name = (payload or {}).get("tool") or (tool_call.tool if tool_call is not None else None)
    if not name:
        return None
    tool = Tool.objects.select_related("approver_group").filter(name=name).first()
    return tool.approver_group if tool else None


def requested_event_payload(approval: ApprovalRequest) -> dict:
    return {
        "request_id": approval.pk,
        "kind": approval.kind,
        "title": approval.title,
        "step_id": approval.step_id,
        "node_id": approval.step.node_id if approval.step_id else None,
        "tool": (approval.payload or {}).get("tool"),
        "payload": approval.payload,
        "due_at": approval.due_at.isoformat() if approval.due_at else None,
        "default_outcome": approval.default_outcome,
        "approver_group": approval.approver_group.name if approval.approver_group_id else None,
        "url": f"/approvals/{approval.pk}/",
    }


def publish_change(request_id: int, action: str) -> None:
    """Tell every inbox consumer that a request was "requested" or "decided"."""
    publish_to_group(
        APPROVALS_GROUP, {"type": "approval.changed", "request_id": request_id, "action": action}
    )


# --- presentation (shared by the inbox page and the socket) -------------------------------------


def editable_key(approval: ApprovalRequest) -> str | None:
    key = EDITABLE_KEYS.get(approval.kind)
    return key if key and isinstance(approval.payload, dict) and key in approval.payload else None


def pretty(value) -> str:
    """Text as is, anything else as indented JSON (autoescaped by the templates)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def card_context(
    approval: ApprovalRequest,
    *,
    can_decide: bool,
    live: bool = True,
    errors: dict | None = None,
    values: dict | None = None,
) -> dict:
    """What `approvals/_request.html` needs. `values` refills a form that failed validation."""
    payload = approval.payload
    if not isinstance(payload, dict):
        payload = {"value": payload}
    context = approval.context
    if not isinstance(context, dict):
        context = {"context": context}
    key = editable_key(approval)
    tool_name = payload.get("tool") or (approval.tool_call.tool if approval.tool_call_id else "")
    values = values or {}
    edit_text = values.get("edited") or (
        json.dumps(payload[key], indent=2, ensure_ascii=False, default=str) if key else ""
    )
    return {
        "approval": approval,
        "can_decide": can_decide and approval.status == ApprovalRequest.PENDING,
        "live": live,
        "tool_name": tool_name,
        "proposed": {k: pretty(v) for k, v in payload.items() if k != "tool"},
        "cap_figures": cap_request_figures(payload) if approval.kind == "budget" else [],
        "context_items": [(k, pretty(v)) for k, v in context.items()],
        "edit_key": key,
        "edit_text": edit_text,
        "values": values,
        # Templates cannot read "__all__": errors that belong to no field are "general".
        "errors": {("general" if k == "__all__" else k): v for k, v in (errors or {}).items()},
        "overdue": bool(approval.due_at and approval.due_at <= timezone.now()),
    }


def render_card(approval: ApprovalRequest, *, can_decide: bool, request=None, **options) -> str:
    return render_to_string(
        "approvals/_request.html",
        {"c": card_context(approval, can_decide=can_decide, **options)},
        request=request,
    )


def render_badge(count: int) -> str:
    """The navigation badge of base.html, as an out-of-band swap with the user's new count."""
    return render_to_string("base.html#approvals-badge", {"pending_approvals": count, "oob": True})


def render_added(card_html: str) -> str:
    return format_html('<div hx-swap-oob="beforeend:#approval-items">{}</div>', card_html)


def render_removed(request_id: int) -> str:
    return format_html('<div id="approval-{}" hx-swap-oob="delete"></div>', request_id)
