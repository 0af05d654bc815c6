"""The audit log at /audit/: admin changes, approval decisions and run controls in one
merged, paginated, filterable list, for staff only."""

import datetime as dt
import re

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.urls import path
from django.utils import timezone

from approvals.decisions import decide_approval
from approvals.models import ApprovalRequest
from orchestrator_site import audit
from orchestrator_site.urls import urlpatterns as site_urlpatterns
from runs import engine
from runs.models import Run, RunEvent
from teams.models import Workflow
from tests.security.payloads import build_world

# The lead adds `path("audit/", audit.audit_log, name="audit")` to orchestrator_site/urls.py;
# until then these tests mount it themselves.
urlpatterns = [
    *[p for p in site_urlpatterns if getattr(p, "name", None) != "audit"],
    path("audit/", audit.audit_log, name="audit"),
]
pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def rows(response) -> list[list[str]]:
    """The table as text cells, top to bottom."""
    html = response.content.decode()
    body = re.search(r'<table class="table" id="audit-entries">.*?<tbody>(.*?)</tbody>', html, re.S)
    if body is None:
        return []
    return [
        [
            re.sub(r"<[^>]+>", "", cell).strip()
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body[1], re.S)
    ]


def log_admin_change(user, obj, flag=CHANGE, message="[]", at=None) -> LogEntry:
    entry = LogEntry.objects.create(
        user=user,
        content_type=ContentType.objects.get_for_model(obj),
        object_id=str(obj.pk),
        object_repr=str(obj)[:200],
        action_flag=flag,
        change_message=message,
    )
    if at is not None:
        LogEntry.objects.filter(pk=entry.pk).update(action_time=at)
    return entry


@pytest.fixture
def history(alice, bob, admin_user):
    """Each kind at known times: run controls now (build_world's, a cancel) and a day ago (a
    pause), a decision two days ago, an admin edit three days ago, an edited escalation ten."""
    from django.contrib.auth.models import Permission

    alice.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    world = build_world(alice, "audit", members=[bob], slug="audited")
    now = timezone.now()
    log_admin_change(
        admin_user,
        world.workflow,
        CHANGE,
        '[{"changed": {"fields": ["Name"]}}]',
        at=now - dt.timedelta(days=3),
    )
    decide_approval(world.pending.pk, alice, approve=False, comment="Not this week")
    ApprovalRequest.objects.filter(pk=world.pending.pk).update(
        decided_at=now - dt.timedelta(days=2)
    )
    ApprovalRequest.objects.filter(pk=world.decided.pk).update(
        decided_at=now - dt.timedelta(days=10)
    )
    engine.pause_run(world.run, bob)
    RunEvent.objects.filter(kind="run.control", payload__action="pause").update(
        created_at=now - dt.timedelta(days=1)
    )
    engine.cancel_run(Run.objects.get(pk=world.run.pk), alice)
    return world


def test_staff_see_every_kind_merged_newest_first(history, admin_user):
    response = logged_in(admin_user).get("/audit/")
    assert response.status_code == 200
    table = rows(response)
    kinds = [row[1] for row in table]
    assert kinds == ["Run control"] * 3 + ["Approval decision", "Admin change", "Approval decision"]
    cancel = next(row for row in table if row[3] == "cancel")
    assert cancel[2] == "alice" and cancel[4] == f"run #{history.run.pk}"
    pause = next(row for row in table if row[3] == "pause")
    assert pause[2] == "bob"
    decision, escalation = (row for row in table if row[1] == "Approval decision")
    assert decision[2] == "alice" and decision[3] == "rejected approval step"
    assert decision[5] == "Not this week"
    assert escalation[3] == "rejected escalation with an edit"
    edit = next(row for row in table if row[1] == "Admin change")
    assert edit[2] == "admin" and edit[3] == "changed workflow"
    assert edit[5] == "Changed Name."
    times = re.findall(r'<time datetime="([^"]+)"', response.content.decode())
    assert times == sorted(times, reverse=True)


def test_entries_link_to_what_they_are_about(history, admin_user):
    html = logged_in(admin_user).get("/audit/").content.decode()
    assert f'href="/runs/{history.run.pk}/"' in html
    assert f'href="/approvals/{history.pending.pk}/"' in html
    assert f'href="/admin/teams/workflow/{history.workflow.pk}/change/"' in html


@pytest.mark.parametrize(
    "query, kinds",
    [
        ("kind=admin", {"Admin change"}),
        ("kind=approval", {"Approval decision"}),
        ("kind=run_control", {"Run control"}),
    ],
)
def test_filter_by_kind(history, admin_user, query, kinds):
    table = rows(logged_in(admin_user).get(f"/audit/?{query}"))
    assert table and {row[1] for row in table} == kinds


def test_filter_by_user_covers_every_kind(history, admin_user):
    assert {row[2] for row in rows(logged_in(admin_user).get("/audit/?user=alice"))} == {"alice"}
    alice_kinds = {row[1] for row in rows(logged_in(admin_user).get("/audit/?user=alice"))}
    assert alice_kinds == {"Approval decision", "Run control"}
    assert [row[3] for row in rows(logged_in(admin_user).get("/audit/?user=bob"))] == ["pause"]
    assert [row[1] for row in rows(logged_in(admin_user).get("/audit/?user=admin"))] == [
        "Admin change"
    ]
    assert rows(logged_in(admin_user).get("/audit/?user=nobody")) == []


def test_filter_by_date_range(history, admin_user):
    today = timezone.now().date()
    client = logged_in(admin_user)
    two_days_ago = (today - dt.timedelta(days=2)).isoformat()
    table = rows(client.get(f"/audit/?start={two_days_ago}&end={two_days_ago}"))
    assert [row[1] for row in table] == ["Approval decision"]
    since_yesterday = rows(client.get(f"/audit/?start={today - dt.timedelta(days=1)}"))
    assert {row[1] for row in since_yesterday} == {"Run control"}
    assert rows(client.get("/audit/?end=2000-01-01")) == []


def test_an_invalid_filter_shows_nothing_and_says_why(history, admin_user):
    response = logged_in(admin_user).get("/audit/?start=2024-05-02&end=2024-05-01&kind=nope")
    assert response.status_code == 400
    assert rows(response) == []
    html = response.content.decode()
    assert "The end date is before the start date." in html
    assert "Select a valid choice" in html


def test_the_log_is_paginated_in_one_merged_order(history, admin_user):
    workflow = Workflow.objects.get(slug="audited")
    start = timezone.now() - dt.timedelta(days=30)
    for minute in range(120):
        log_admin_change(
            admin_user,
            workflow,
            ADDITION if minute % 2 else DELETION,
            at=start + dt.timedelta(minutes=minute),
        )
    client = logged_in(admin_user)
    first, last = client.get("/audit/"), client.get("/audit/?page=3")
    total = 121 + sum(
        len(rows(client.get(f"/audit/?kind={kind}"))) for kind in ("run_control", "approval")
    )
    assert f"{total} entries" in first.content.decode()
    assert len(rows(first)) == audit.PAGE_SIZE
    assert len(rows(last)) == total - 2 * audit.PAGE_SIZE
    seen = [r[0] for page in (1, 2, 3) for r in rows(client.get(f"/audit/?page={page}"))]
    assert seen == sorted(seen, reverse=True) and len(seen) == total
    assert 'href="?page=2"' in first.content.decode()
    filtered = client.get("/audit/?kind=admin&page=2").content.decode()
    assert 'href="?kind=admin&amp;page=1"' in filtered
    assert "deleted workflow" in filtered and "added workflow" in filtered


@pytest.mark.parametrize("user", ["alice", "bob", "charlie"])
def test_non_staff_are_refused(history, request, user):
    assert logged_in(request.getfixturevalue(user)).get("/audit/").status_code == 403


def test_anonymous_visitors_are_sent_to_log_in(client):
    response = client.get("/audit/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_the_log_is_read_only(admin_user):
    client = logged_in(admin_user)
    for method in ("post", "put", "delete"):
        assert getattr(client, method)("/audit/").status_code == 405
