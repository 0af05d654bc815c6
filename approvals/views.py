import json
from urllib.parse import urlencode

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from approvals import decisions
from approvals.decisions import AlreadyDecided, decide_approval
from approvals.forms import BulkDecisionForm, DecisionForm, InboxFilterForm
from approvals.models import ApprovalRequest
from approvals.requests import card_context, editable_key, render_badge, render_removed
from runs.models import RunEvent

PAGE_SIZE = 50
FILTER_FIELDS = ("workflow", "kind", "run", "sort")


def _approvals_for(user):
    return ApprovalRequest.objects.for_user(user).select_related(
        "run__workflow", "run__version", "step", "tool_call", "approver_group", "decided_by"
    )


def _get_approval_for_user(request: HttpRequest, pk: int) -> ApprovalRequest:
    return get_object_or_404(_approvals_for(request.user), pk=pk)


def inbox(request: HttpRequest) -> HttpResponse:
    form = InboxFilterForm(request.user, request.GET)
    approvals = form.filter(_approvals_for(request.user).pending())
    page = Paginator(approvals, PAGE_SIZE).get_page(request.GET.get("page"))
    may_decide = decisions.decider_for(request.user)
    filters = {k: request.GET[k] for k in FILTER_FIELDS if request.GET.get(k)}
    context = {
        "form": form,
        "page": page,
        "cards": [card_context(a, can_decide=may_decide(a)) for a in page],
        "any_decidable": decisions.has_decide_permission(request.user),
        "socket_url": "/ws/approvals/" + (f"?{urlencode(filters)}" if filters else ""),
        "filter_query": urlencode(filters),
    }
    if request.htmx and request.htmx.target == "approval-list":
        return render(request, "approvals/inbox.html#list", context)
    return render(request, "approvals/inbox.html", context)


def approval_detail(request: HttpRequest, pk: int) -> HttpResponse:
    approval = _get_approval_for_user(request, pk)
    return _render_detail(request, approval)


def _render_detail(
    request: HttpRequest, approval: ApprovalRequest, *, errors=None, values=None, status: int = 200
) -> HttpResponse:
    events = RunEvent.objects.filter(
        run_id=approval.run_id,
        kind__in=("approval.requested", "approval.decided"),
        payload__request_id=approval.pk,
    ).order_by("seq")
    history = [{"event": e, "diff": _diff_rows(e.payload.get("diff") or [])} for e in events]
    diff = _diff_rows(
        decisions.payload_diff(approval.payload, approval.edited_payload)
        if approval.edited_payload is not None
        else []
    )
    context = {
        "c": card_context(
            approval,
            can_decide=decisions.can_decide(request.user, approval),
            live=False,
            errors=errors,
            values=values,
        ),
        "approval": approval,
        "history": history,
        "diff": diff,
        "decider": decisions.decider_name(approval),
    }
    return render(request, "approvals/detail.html", context, status=status)


def _diff_rows(changes: list[dict]) -> list[dict]:
    """Diff entries with their values as JSON text, the way they were edited."""

    def show(value, present: bool) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str) if present else "—"

    return [
        {
            "path": c["path"],
            "change": c["change"],
            "old": show(c["old"], c["change"] != "added"),
            "new": show(c["new"], c["change"] != "removed"),
        }
        for c in changes
    ]


@require_POST
def decide(request: HttpRequest, pk: int) -> HttpResponse:
    """Approve, reject (with a reason) or edit then approve one request."""
    approval = _get_approval_for_user(request, pk)
    if not decisions.can_decide(request.user, approval):
        raise PermissionDenied("You may not decide this request.")
    form = DecisionForm(request.POST)
    errors: dict = {}
    if form.is_valid():
        data = form.cleaned_data
        edited_payload = None
        key = editable_key(approval)
        if data["edited"] is not None and data["decision"] == "approve":
            if key is None:
                errors = {"edited": ["This request has nothing to edit."]}
            else:
                edited_payload = {**approval.payload, key: data["edited"]["value"]}
        if not errors:
            try:
                decided = decide_approval(
                    approval.pk,
                    request.user,
                    approve=data["decision"] == "approve",
                    comment=data["comment"],
                    edited_payload=edited_payload,
                )
            except AlreadyDecided as exc:
                return _after(request, approval, str(exc), ok=False)
            except ValidationError as exc:
                errors = _error_dict(exc)
            else:
                return _after(request, decided, _decided_message(decided), ok=True)
    else:
        errors = {field: list(msgs) for field, msgs in form.errors.items()}
    values = {k: request.POST.get(k, "") for k in ("decision", "comment", "edited")}
    if request.htmx:
        context = {"c": card_context(approval, can_decide=True, errors=errors, values=values)}
        return render(request, "approvals/_request.html", context)
    return _render_detail(request, approval, errors=errors, values=values, status=400)


def _error_dict(exc: ValidationError) -> dict[str, list[str]]:
    if hasattr(exc, "error_dict"):
        return {
            field: [m for e in errs for m in e.messages] for field, errs in exc.error_dict.items()
        }
    return {"__all__": exc.messages}


def _decided_message(approval: ApprovalRequest) -> str:
    verb = "Approved" if approval.status == ApprovalRequest.APPROVED else "Rejected"
    edited = " with your edit" if approval.edited_payload is not None else ""
    return f"{verb}{edited}: {approval.title} (run #{approval.run_id})."


def _after(
    request: HttpRequest,
    approval: ApprovalRequest | None,
    message: str,
    *,
    ok: bool,
    removed: tuple[int, ...] | None = None,
) -> HttpResponse:
    """htmx: drop the card(s), say what happened, refresh the badge. Otherwise redirect."""
    if request.htmx:
        count = ApprovalRequest.objects.for_user(request.user).pending().count()
        extra = "".join(render_removed(pk) for pk in (removed or ()))
        return HttpResponse(extra + _flash(message, ok) + render_badge(count))
    (messages.success if ok else messages.error)(request, message)
    target = request.POST.get("next", "")
    if not ok and approval is not None:
        return redirect("approvals:detail", pk=approval.pk)
    if url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return HttpResponseRedirect(target)
    return redirect("approvals:inbox")


def _flash(message: str, ok: bool) -> str:
    return format_html(
        '<div id="approvals-flash" hx-swap-oob="true" role="status" class="message {}">{}</div>',
        "message-success" if ok else "message-error",
        message,
    )


@require_POST
def bulk_decide(request: HttpRequest) -> HttpResponse:
    """Approve or reject every checked request, each in its own transaction."""
    if not decisions.has_decide_permission(request.user):
        raise PermissionDenied("You may not decide approval requests.")
    form = BulkDecisionForm(request.POST, ids=request.POST.getlist("ids"))
    if not form.is_valid():
        problems = [m for msgs in form.errors.values() for m in msgs]
        return (
            _after(request, None, " ".join(problems), ok=False)
            if request.htmx
            else _bulk_redirect(request, " ".join(problems), ok=False)
        )
    data = form.cleaned_data
    approve = data["decision"] == "approve"
    found = set(
        _approvals_for(request.user).filter(pk__in=data["ids"]).values_list("pk", flat=True)
    )
    done: list[int] = []
    problems = [f"#{pk}: not found." for pk in data["ids"] if pk not in found]
    for pk in sorted(found):
        try:
            decide_approval(pk, request.user, approve=approve, comment=data["comment"])
        except (AlreadyDecided, PermissionDenied) as exc:
            problems.append(f"#{pk}: {exc}")
        except ValidationError as exc:
            problems.append(f"#{pk}: {' '.join(exc.messages)}")
        else:
            done.append(pk)
    verb = "Approved" if approve else "Rejected"
    message = f"{verb} {len(done)} request{'s' if len(done) != 1 else ''}."
    if problems:
        message += " Not decided: " + " ".join(problems)
    if request.htmx:
        return _after(request, None, message, ok=not problems, removed=tuple(done))
    return _bulk_redirect(request, message, ok=not problems)


def _bulk_redirect(request: HttpRequest, message: str, *, ok: bool) -> HttpResponse:
    (messages.success if ok else messages.error)(request, message)
    query = request.POST.get("filter_query", "")
    return redirect(reverse("approvals:inbox") + (f"?{query}" if query else ""))
