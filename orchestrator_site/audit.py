"""The audit log: who changed what, for staff, in one list.

Three records already exist and are merged here, newest first:
- admin changes: Django's `LogEntry` (every add, change and delete made in the admin);
- approval decisions: `ApprovalRequest` rows with a `decided_at` (by a person or by expiry);
- run controls: the `run.control` events the engine appends ({action, user}) on cancel, pause,
  resume, retry, fork and the global stop.

Nothing new is written: each source stays the truth for its own kind. The page is paginated
over the merged order without materialising it: page N needs at most N * PAGE_SIZE rows of each
source (each read newest first, on an indexed time column), merged with heapq.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from urllib.parse import urlencode

from django import forms
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from approvals.models import ApprovalRequest
from runs.models import RunEvent

PAGE_SIZE = 50
KINDS = [
    ("admin", "Admin change"),
    ("approval", "Approval decision"),
    ("run_control", "Run control"),
]
ADMIN_ACTIONS = {ADDITION: "added", CHANGE: "changed", DELETION: "deleted"}


class AuditFilterForm(forms.Form):
    kind = forms.ChoiceField(required=False, choices=[("", "Everything"), *KINDS])
    user = forms.CharField(
        required=False,
        max_length=150,
        label="User",
        widget=forms.TextInput(attrs={"placeholder": "username"}),
    )
    start = forms.DateField(
        required=False, label="From", widget=forms.DateInput(attrs={"type": "date"})
    )
    end = forms.DateField(
        required=False, label="To", widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self) -> dict:
        data = super().clean()
        if data.get("start") and data.get("end") and data["start"] > data["end"]:
            self.add_error("end", "The end date is before the start date.")
        return data


@dataclass(frozen=True)
class Entry:
    at: dt.datetime
    kind: str
    user: str
    action: str
    target: str
    url: str
    detail: str

    @property
    def kind_label(self) -> str:
        return dict(KINDS)[self.kind]


@dataclass(frozen=True)
class Source:
    """One kind of record: its rows in newest-first order, and how one becomes an Entry."""

    kind: str
    rows: QuerySet
    to_entry: Callable[[object], Entry]

    def newest(self, count: int):
        return (self.to_entry(row) for row in self.rows[:count])


class MergedLog:
    """The sources as one newest-first sequence, for Paginator: `count()` adds up the sources'
    counts; a slice reads its end's worth of rows from each source and merges them."""

    def __init__(self, sources: list[Source]):
        self.sources = sources

    def count(self) -> int:
        return sum(source.rows.count() for source in self.sources)

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, index: slice) -> list[Entry]:
        stop = index.stop
        merged = heapq.merge(
            *(source.newest(stop) for source in self.sources),
            key=lambda entry: entry.at,
            reverse=True,
        )
        return list(islice(merged, index.start or 0, stop))


# --- the three sources ------------------------------------------------------------------------


def _admin_source(user: str, since, until) -> Source:
    rows = LogEntry.objects.select_related("user", "content_type").order_by("-action_time", "-id")
    if user:
        rows = rows.filter(user__username=user)
    rows = _in_range(rows, "action_time", since, until)

    def entry(log: LogEntry) -> Entry:
        model = log.content_type.name if log.content_type_id else "object"
        url = ""
        if log.action_flag != DELETION:
            url = log.get_admin_url() or ""
        return Entry(
            at=log.action_time,
            kind="admin",
            user=log.user.get_username() if log.user else "",
            action=f"{ADMIN_ACTIONS.get(log.action_flag, 'changed')} {model}",
            target=log.object_repr,
            url=url,
            detail=log.get_change_message(),
        )

    return Source("admin", rows, entry)


def _approval_source(user: str, since, until) -> Source:
    rows = (
        ApprovalRequest.objects.filter(decided_at__isnull=False)
        .select_related("decided_by")
        .order_by("-decided_at", "-id")
    )
    if user:
        rows = rows.filter(decided_by__username=user)
    rows = _in_range(rows, "decided_at", since, until)

    def entry(approval: ApprovalRequest) -> Entry:
        if approval.decided_by_id:
            who = approval.decided_by.get_username()
        else:
            who = "system" if approval.decided_by_system else ""
        edited = " with an edit" if approval.edited_payload is not None else ""
        return Entry(
            at=approval.decided_at,
            kind="approval",
            user=who,
            action=f"{approval.get_status_display().lower()} {approval.get_kind_display().lower()}"
            f"{edited}",
            target=f"{approval.title} (run #{approval.run_id})",
            url=reverse("approvals:detail", args=[approval.pk]),
            detail=approval.comment,
        )

    return Source("approval", rows, entry)


def _control_source(user: str, since, until) -> Source:
    rows = RunEvent.objects.filter(kind="run.control").order_by("-created_at", "-id")
    if user:
        rows = rows.filter(payload__user=user)
    rows = _in_range(rows, "created_at", since, until)

    def entry(event: RunEvent) -> Entry:
        payload = event.payload if isinstance(event.payload, dict) else {}
        return Entry(
            at=event.created_at,
            kind="run_control",
            user=str(payload.get("user") or ""),
            action=str(payload.get("action") or "control"),
            target=f"run #{event.run_id}",
            url=reverse("runs:detail", args=[event.run_id]),
            detail="",
        )

    return Source("run_control", rows, entry)


def _in_range(rows: QuerySet, field: str, since, until) -> QuerySet:
    if since:
        rows = rows.filter(Q(**{f"{field}__gte": since}))
    if until:
        rows = rows.filter(Q(**{f"{field}__lt": until}))
    return rows


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)


# --- the view ---------------------------------------------------------------------------------


@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    """Staff only: the log names every user and what they decided, across all workflows."""
    if not request.user.is_staff:
        raise PermissionDenied("The audit log is for staff.")
    form = AuditFilterForm(request.GET or None)
    data = form.cleaned_data if form.is_valid() else {}
    kind, user = data.get("kind") or "", (data.get("user") or "").strip()
    since = _day_start(data["start"]) if data.get("start") else None
    # The last representable day has no "next day": leave the range open at the end.
    last_day = data.get("end") and data["end"] < dt.date.max
    until = _day_start(data["end"] + dt.timedelta(days=1)) if last_day else None
    builders = {
        "admin": _admin_source,
        "approval": _approval_source,
        "run_control": _control_source,
    }
    sources = [
        build(user, since, until) for name, build in builders.items() if not kind or kind == name
    ]
    if form.is_bound and not form.is_valid():
        sources = []  # a filter that does not validate shows nothing rather than everything
    page = Paginator(MergedLog(sources), PAGE_SIZE).get_page(request.GET.get("page"))
    filters = {k: v for k, v in request.GET.items() if k != "page" and v}
    return render(
        request,
        "audit/log.html",
        {
            "form": form,
            "page": page,
            "filter_query": urlencode(filters),
        },
        status=200 if not form.is_bound or form.is_valid() else 400,
    )
