"""Deciding an approval request: who may, what an edit may change, and the one decision that wins.

`decide_approval` is the only code that moves a request out of `pending`. Humans call it from the
inbox, the beat task calls it (as the system) when a deadline passes. Either way the run reacts
through `runs.engine.apply_decision`, inside the transaction that records the decision, so a
decision and the run's resumption commit together or not at all.
"""

import json
import logging
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import jsonschema
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from approvals.models import ApprovalRequest
from approvals.requests import editable_key, publish_change
from runs.events import append_event
from runs.models import Run
from teams.models import Tool
from teams.spec import node_map

log = logging.getLogger(__name__)

DECIDE_PERMISSION = "approvals.decide_approvalrequest"


class AlreadyDecided(Exception):
    """Someone (or the deadline) decided first. `str()` says who and when."""

    def __init__(self, approval: ApprovalRequest):
        self.approval = approval
        super().__init__(already_decided_message(approval))


def already_decided_message(approval: ApprovalRequest) -> str:
    when = (
        timezone.localtime(approval.decided_at).strftime("%Y-%m-%d %H:%M:%S %Z")
        if approval.decided_at
        else "an unknown time"
    )
    return f"Already {approval.status} by {decider_name(approval)} at {when}."


def decider_name(approval: ApprovalRequest) -> str:
    if approval.decided_by_system:
        return "the system"
    if approval.decided_by is not None:
        return approval.decided_by.get_username()
    return "a deleted user"


# --- who may decide -------------------------------------------------------------------------


def has_decide_permission(user) -> bool:
    return bool(
        user
        and user.is_authenticated
        and user.is_active
        and (user.is_superuser or user.has_perm(DECIDE_PERMISSION))
    )


def decider_for(user) -> Callable[[ApprovalRequest], bool]:
    """A check of "may `user` decide this request?" for many requests taken from the user's own
    scope (`ApprovalRequest.objects.for_user`): the permission, and membership of the request's
    approver group when it has one. One query for the user's groups, none per request."""
    if not has_decide_permission(user):
        return lambda approval: False
    if user.is_superuser:
        return lambda approval: True
    ids = set(user.groups.values_list("id", flat=True))

    def may_decide(approval: ApprovalRequest) -> bool:
        if spends_past_the_global_cap(approval) and not user.is_staff:
            return False
        return not approval.approver_group_id or approval.approver_group_id in ids

    return may_decide


def spends_past_the_global_cap(approval: ApprovalRequest) -> bool:
    """A request to let a run go past the global monthly cap spends everybody's money: staff
    decide it, whatever the workflow's approver group."""
    payload = approval.payload if isinstance(approval.payload, dict) else {}
    return approval.kind == "budget" and payload.get("cap") == "global_monthly"


def can_decide(user, approval: ApprovalRequest) -> bool:
    """`decider_for` plus sight of the run, for a request from anywhere."""
    return decider_for(user)(approval) and (
        Run.objects.for_user(user).filter(pk=approval.run_id).exists()
    )


def approvers(approval: ApprovalRequest):
    """Active users who may decide `approval` and have an email address (for notifications)."""
    users = get_user_model().objects.filter(is_active=True).exclude(email="")
    perm = Permission.objects.filter(
        content_type__app_label="approvals", codename="decide_approvalrequest"
    ).first()
    allowed = Q(is_superuser=True)
    if perm is not None:
        allowed |= Q(user_permissions=perm) | Q(groups__permissions=perm)
    users = users.filter(allowed)
    if approval.approver_group_id:
        users = users.filter(Q(is_superuser=True) | Q(groups=approval.approver_group_id))
    run = approval.run
    sees_run = Q(is_staff=True) | Q(owned_workflows=run.workflow_id) | Q(workflows=run.workflow_id)
    if run.started_by_id:
        sees_run |= Q(pk=run.started_by_id)
    return users.filter(sees_run).distinct().order_by("pk")


# --- what an edit may change ----------------------------------------------------------------


def tool_for(approval: ApprovalRequest) -> Tool | None:
    name = (approval.payload or {}).get("tool") or (
        approval.tool_call.tool if approval.tool_call_id else None
    )
    return Tool.objects.filter(name=name).first() if name else None


def output_schema_for(approval: ApprovalRequest) -> dict | None:
    if approval.step_id is None:
        return None
    node = node_map(approval.run.version.get_spec()).get(approval.step.node_id) or {}
    schema = node.get("output_schema")
    return schema if isinstance(schema, dict) else None


def _schema_errors(instance, schema: dict, prefix: str) -> list[str]:
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [f"The schema to check against is itself invalid: {exc.message}"]
    errors = sorted(
        validator_class(schema).iter_errors(instance),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    messages = []
    for error in errors:
        path = ".".join([prefix, *(str(p) for p in error.absolute_path)])
        messages.append(f"{path}: {error.message}")
    return messages


def clean_edit(approval: ApprovalRequest, edited_payload) -> dict | None:
    """Check an edited payload; return it normalised, or None when it changes nothing.

    Only the kind's editable part may change (a tool call's arguments, an output, a budget
    raise); tool arguments are checked against the tool's `args_schema`, an output against its
    node's `output_schema`. Raises ValidationError({"edited": [...]}).
    """
    if not isinstance(edited_payload, dict):
        raise ValidationError({"edited": ["The edited payload must be a JSON object."]})
    key = editable_key(approval)
    if key is None:
        raise ValidationError(
            {"edited": [f"A {approval.get_kind_display().lower()} request has nothing to edit."]}
        )
    size = len(json.dumps(edited_payload, default=str))
    if size > settings.BATON_MAX_INPUT_BYTES:
        raise ValidationError(
            {
                "edited": [
                    f"The edit is {size} bytes; the limit is {settings.BATON_MAX_INPUT_BYTES}."
                ]
            }
        )
    others = {k: v for k, v in edited_payload.items() if k != key}
    original_others = {k: v for k, v in approval.payload.items() if k != key}
    if others != original_others:
        changed = sorted(
            set(others) ^ set(original_others)
            | {k for k in others if others.get(k) != original_others.get(k)}
        )
        raise ValidationError(
            {"edited": [f"Only `{key}` may be edited, not {', '.join(f'`{k}`' for k in changed)}."]}
        )
    value = edited_payload.get(key)
    if approval.kind == "tool_call":
        errors = _check_tool_arguments(approval, value)
    elif approval.kind == "budget":
        value, errors = _check_raise(value, approval.payload.get("limit"))
    else:
        schema = output_schema_for(approval)
        errors = _schema_errors(value, schema, key) if schema else []
    if errors:
        raise ValidationError({"edited": errors})
    cleaned = {**approval.payload, key: value}
    return None if cleaned == approval.payload else cleaned


def _check_tool_arguments(approval: ApprovalRequest, arguments) -> list[str]:
    if not isinstance(arguments, dict):
        return ["arguments: must be a JSON object."]
    tool = tool_for(approval)
    if tool is None:
        return ["The tool of this request no longer exists, so its arguments cannot be checked."]
    return _schema_errors(arguments, tool.args_schema or {"type": "object"}, "arguments")


def _check_raise(value, limit: str | None) -> tuple[str | None, list[str]]:
    if isinstance(value, bool):
        return None, [f"raise_by: {value!r} is not an amount."]
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None, [f"raise_by: {value!r} is not an amount."]
    if not amount.is_finite() or amount <= 0:
        return None, ["raise_by: must be more than 0."]
    if amount.adjusted() >= 9:  # 1E+999999999 overflows the engine's Decimal arithmetic
        return None, ["raise_by: must be less than 1,000,000,000."]
    if limit == "max_tokens" and amount != amount.to_integral_value():
        return None, ["raise_by: a token budget grows by a whole number of tokens."]
    return str(amount), []


def payload_diff(before, after, path: str = "") -> list[dict]:
    """What an edit changed, as a list of {path, change, old, new} (dicts walked key by key)."""
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for key in [*before, *(k for k in after if k not in before)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in after:
                changes.append({"path": sub, "change": "removed", "old": before[key], "new": None})
            elif key not in before:
                changes.append({"path": sub, "change": "added", "old": None, "new": after[key]})
            else:
                changes += payload_diff(before[key], after[key], sub)
        return changes
    if before != after:
        return [{"path": path or "(whole)", "change": "changed", "old": before, "new": after}]
    return []


# --- the decision ---------------------------------------------------------------------------


def decide_approval(
    request_id: int,
    user,
    *,
    approve: bool,
    comment: str = "",
    edited_payload: dict | None = None,
    system: bool = False,
) -> ApprovalRequest:
    """Record one decision and let the run react; the first decision wins.

    1. Check the user may decide (skipped for the system), that a rejection has a reason and that
       an edit is valid.
    2. In one transaction: a compare-and-swap `pending -> decided` update. When no row changed,
       someone else won: raise AlreadyDecided naming them. Otherwise call
       `runs.engine.apply_decision` (it resumes the run exactly once, because only the winner
       gets here), append the `approval.decided` run event (the audit record: who, when,
       outcome, comment, diff) and, on commit, remove the request from every inbox.

    A system decision (deadline) is stored as status "expired" with the applied outcome in the
    comment. Raises PermissionDenied, ValidationError or AlreadyDecided.
    """
    from runs import engine  # the engine loads the LLM seam; the inbox should not at import

    approval = ApprovalRequest.objects.select_related(
        "run__workflow", "run__version", "step", "tool_call"
    ).get(pk=request_id)
    if not system:
        if not Run.objects.for_user(user).filter(pk=approval.run_id).exists():
            raise PermissionDenied("You cannot see this run.")
        if not can_decide(user, approval):
            raise PermissionDenied("You may not decide this request.")
    if approval.status == ApprovalRequest.PENDING and approval.run.status in Run.TERMINAL:
        cancel_request_of_ended_run(approval.pk)
        approval.refresh_from_db()
    if approval.status != ApprovalRequest.PENDING:
        raise AlreadyDecided(approval)
    comment = (comment or "").strip()
    if not approve and not comment and not system:
        raise ValidationError({"comment": ["A rejection needs a reason."]})
    if edited_payload is not None:
        if not approve:
            raise ValidationError({"edited": ["Only an approval can carry an edit."]})
        edited_payload = clean_edit(approval, edited_payload)

    if system:
        status = ApprovalRequest.EXPIRED
    else:
        status = ApprovalRequest.APPROVED if approve else ApprovalRequest.REJECTED
    now = timezone.now()
    with transaction.atomic():
        won = ApprovalRequest.objects.filter(pk=request_id, status=ApprovalRequest.PENDING).update(
            status=status,
            decided_by=None if system else user,
            decided_by_system=system,
            decided_at=now,
            comment=comment,
            edited_payload=edited_payload,
        )
        if not won:
            raise AlreadyDecided(
                ApprovalRequest.objects.select_related("decided_by").get(pk=request_id)
            )
        approval.refresh_from_db()
        try:
            engine.apply_decision(
                approval, approved=approve, payload=edited_payload, comment=comment
            )
        except engine.RunControlError as exc:
            # The run cannot take a decision now; leaving the atomic block undoes ours.
            raise ValidationError(str(exc)) from exc
        append_event(approval.run_id, "approval.decided", decided_event_payload(approval, approve))
        transaction.on_commit(lambda: publish_change(approval.pk, "decided"), robust=True)
    return approval


def cancel_request_of_ended_run(request_id: int) -> bool:
    """Close a pending request whose run already ended (cancelled, failed...): nobody can act on
    it any more. Recorded like a decision, by the system, so the audit trail stays complete."""
    with transaction.atomic():
        approval = ApprovalRequest.objects.select_related("run", "step").get(pk=request_id)
        if approval.run.status not in Run.TERMINAL:
            return False
        won = ApprovalRequest.objects.filter(pk=request_id, status=ApprovalRequest.PENDING).update(
            status=ApprovalRequest.CANCELLED,
            decided_by=None,
            decided_by_system=True,
            decided_at=timezone.now(),
            comment=f"The run ended ({approval.run.get_status_display().lower()}) "
            "before a decision.",
        )
        if not won:
            return False
        approval.refresh_from_db()
        append_event(approval.run_id, "approval.decided", decided_event_payload(approval, None))
        transaction.on_commit(lambda: publish_change(approval.pk, "decided"), robust=True)
    return True


def decided_event_payload(approval: ApprovalRequest, approved: bool | None) -> dict:
    diff = (
        payload_diff(approval.payload, approval.edited_payload)
        if approval.edited_payload is not None
        else []
    )
    return {
        "request_id": approval.pk,
        "kind": approval.kind,
        "title": approval.title,
        "step_id": approval.step_id,
        "node_id": approval.step.node_id if approval.step_id else None,
        "status": approval.status,
        "outcome": "cancelled" if approved is None else "approved" if approved else "rejected",
        "by": decider_name(approval),
        "by_user_id": approval.decided_by_id,
        "by_system": approval.decided_by_system,
        "at": approval.decided_at.isoformat(),
        "comment": approval.comment,
        "edited": approval.edited_payload is not None,
        "diff": diff,
        "url": f"/approvals/{approval.pk}/",
    }


def expire_due_approvals(now=None, limit: int = 200) -> int:
    """Apply the default outcome to pending requests past their deadline; return how many.

    Each request is decided in its own transaction through `decide_approval`, so a human who
    decides at the same moment either wins (we skip it) or sees "already expired".
    """
    now = now or timezone.now()
    ended = ApprovalRequest.objects.pending().filter(run__status__in=Run.TERMINAL)
    for pk in list(ended.values_list("pk", flat=True)[:limit]):
        cancel_request_of_ended_run(pk)
    due = list(
        ApprovalRequest.objects.pending()
        .filter(due_at__lte=now)
        .order_by("due_at", "pk")
        .values_list("pk", "default_outcome", "due_at")[:limit]
    )
    expired = 0
    for pk, outcome, due_at in due:
        comment = (
            f"No decision by the deadline ({due_at:%Y-%m-%d %H:%M:%S %Z}): "
            f"default outcome '{outcome}' applied."
        )
        try:
            decide_approval(pk, None, approve=outcome == "approve", comment=comment, system=True)
        except AlreadyDecided:
            continue
        except Exception:  # one broken run must not keep the others from expiring
            log.exception("could not expire approval request %s", pk)
            continue
        expired += 1
    return expired
