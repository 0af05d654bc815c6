import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from approvals.decisions import decide_approval
from approvals.models import ApprovalRequest
from tests.approvals.conftest import GATE_SPEC
from tests.factories import make_workflow

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def card_ids(response) -> list[int]:
    return [
        int(pk)
        for pk in re.findall(
            r'<article class="card approval[^"]*" id="approval-(\d+)"', response.content.decode()
        )
    ]


@pytest.fixture
def alice_client(client, alice, deciders):
    client.force_login(alice)
    return client


# --- access ---------------------------------------------------------------------------------


def test_inbox_lists_the_pending_requests_a_user_may_see(
    client, make_paused_run, alice, bob, charlie, deciders
):
    _, _, first = make_paused_run()
    _, _, second = make_paused_run()
    _, _, decided = make_paused_run()
    decide_approval(decided.pk, alice, approve=True)

    client.force_login(bob)
    assert card_ids(client.get("/approvals/")) == [first.pk, second.pk]
    client.force_login(charlie)
    response = client.get("/approvals/")
    assert card_ids(response) == []
    assert "Nothing is waiting for a decision." in response.content.decode()


def test_outsider_gets_404_on_the_detail_page_and_when_deciding(
    client, make_paused_run, charlie, deciders
):
    _, _, approval = make_paused_run()
    client.force_login(charlie)

    assert client.get(f"/approvals/{approval.pk}/").status_code == 404
    response = client.post(f"/approvals/{approval.pk}/decide/", {"decision": "approve"})
    assert response.status_code == 404
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_member_without_permission_sees_no_buttons_and_gets_403(client, make_paused_run, bob):
    _, _, approval = make_paused_run()
    client.force_login(bob)

    page = client.get("/approvals/").content.decode()
    assert f'id="approval-{approval.pk}"' in page
    assert 'data-action="approve"' not in page and 'id="bulk-form"' not in page
    assert "You can see this request but not decide it" in page
    assert (
        client.post(f"/approvals/{approval.pk}/decide/", {"decision": "approve"}).status_code == 403
    )
    assert (
        client.post("/approvals/bulk/", {"decision": "approve", "ids": [approval.pk]}).status_code
        == 403
    )
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_anonymous_visitor_is_sent_to_login(client):
    response = client.get("/approvals/")
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")


# --- the inbox ------------------------------------------------------------------------------


def test_inbox_filters_by_workflow_kind_and_run(alice_client, make_paused_run, alice, bob):
    other = make_workflow(GATE_SPEC, owner=alice, members=[bob], slug="other")
    _, _, node = make_paused_run()
    run, _, tool = make_paused_run(kind="tool_call", node_id="email")
    _, _, elsewhere = make_paused_run(workflow=other)

    assert card_ids(alice_client.get("/approvals/?workflow=other")) == [elsewhere.pk]
    assert card_ids(alice_client.get("/approvals/?kind=tool_call")) == [tool.pk]
    assert card_ids(alice_client.get(f"/approvals/?run={run.pk}")) == [tool.pk]
    assert card_ids(alice_client.get("/approvals/?workflow=gated&kind=node")) == [node.pk]


def test_a_filter_on_a_run_the_user_cannot_see_shows_nothing(
    client, make_paused_run, charlie, deciders
):
    run, _, _ = make_paused_run()
    client.force_login(charlie)
    response = client.get(f"/approvals/?run={run.pk}")
    assert card_ids(response) == [] and "No such run." in response.content.decode()


def test_inbox_sorts_by_age_and_by_due_time(alice_client, make_paused_run):
    _, _, old_no_deadline = make_paused_run()
    _, _, due_late = make_paused_run(due_in_s=3600)
    _, _, due_soon = make_paused_run(due_in_s=60)
    ApprovalRequest.objects.filter(pk=old_no_deadline.pk).update(
        created_at=timezone.now() - timedelta(hours=1)
    )

    assert card_ids(alice_client.get("/approvals/")) == [
        old_no_deadline.pk,
        due_late.pk,
        due_soon.pk,
    ]
    assert card_ids(alice_client.get("/approvals/?sort=newest")) == [
        due_soon.pk,
        due_late.pk,
        old_no_deadline.pk,
    ]
    assert card_ids(alice_client.get("/approvals/?sort=due")) == [
        due_soon.pk,
        due_late.pk,
        old_no_deadline.pk,
    ]


def test_changing_a_filter_with_htmx_returns_only_the_list(alice_client, make_paused_run):
    make_paused_run(kind="tool_call", node_id="email")
    response = alice_client.get(
        "/approvals/?kind=tool_call", HTTP_HX_TARGET="approval-list", **HTMX
    )
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="approval-list"')
    assert 'ws-connect="/ws/approvals/?kind=tool_call"' in html
    assert "<html" not in html


def test_a_row_shows_title_kind_run_tool_arguments_context_and_due_time(
    alice_client, make_paused_run
):
    run, _, approval = make_paused_run(
        kind="tool_call",
        node_id="email",
        due_in_s=600,
        title="Call send_email",
        context={"previous_outputs": [{"node": "draft", "output": "The draft text"}]},
    )
    html = alice_client.get("/approvals/").content.decode()
    assert "Call send_email" in html and "Tool call" in html
    assert f'href="/runs/{run.pk}/"' in html
    assert "<code>send_email</code>" in html
    assert "&quot;to&quot;: &quot;team@example.com&quot;" in html  # pretty JSON, escaped
    assert "The draft text" in html
    assert "due <time" in html and "then automatically: reject" in html
    assert "<kbd>j</kbd>" in html and "<kbd>a</kbd> approve" in html


def test_tool_arguments_and_titles_are_escaped(alice_client, make_paused_run):
    make_paused_run(
        kind="tool_call",
        node_id="email",
        title="<img src=x onerror=alert(1)>",
        tool_payload={
            "tool": "send_email",
            "arguments": {"to": "a@b.c", "subject": "<script>alert(1)</script>", "body": "x"},
        },
    )
    html = alice_client.get("/approvals/").content.decode()
    assert "<script>alert(1)</script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# --- deciding from the inbox ----------------------------------------------------------------


def test_approving_with_htmx_removes_the_card_and_updates_the_badge(alice_client, make_paused_run):
    _, _, approval = make_paused_run()
    make_paused_run()

    response = alice_client.post(
        f"/approvals/{approval.pk}/decide/", {"decision": "approve"}, **HTMX
    )

    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="approvals-badge"' in html and 'hx-swap-oob="true"' in html
    assert re.search(r'id="approvals-badge"[^>]*>1</span>', html)
    assert "Approved: Approve gate" in html
    assert f'id="approval-{approval.pk}"' not in html.replace(
        f'id="approval-{approval.pk}" hx-swap-oob="delete"', ""
    )
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.APPROVED


def test_approving_without_htmx_redirects_back_with_a_message(alice_client, make_paused_run):
    _, _, approval = make_paused_run()
    response = alice_client.post(
        f"/approvals/{approval.pk}/decide/",
        {"decision": "approve", "next": "/approvals/?kind=node"},
        follow=True,
    )
    assert response.redirect_chain[-1][0] == "/approvals/?kind=node"
    assert "Approved: Approve gate" in response.content.decode()


def test_rejecting_without_a_reason_shows_an_inline_error(alice_client, make_paused_run):
    _, _, approval = make_paused_run()

    response = alice_client.post(
        f"/approvals/{approval.pk}/decide/", {"decision": "reject", "comment": ""}, **HTMX
    )

    html = response.content.decode()
    assert f'id="approval-{approval.pk}"' in html
    assert "A rejection needs a reason." in html
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_rejecting_with_a_reason_records_it(alice_client, make_paused_run):
    _, _, approval = make_paused_run()
    alice_client.post(
        f"/approvals/{approval.pk}/decide/",
        {"decision": "reject", "comment": "Wrong audience"},
        **HTMX,
    )
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.REJECTED and approval.comment == "Wrong audience"


def test_edit_with_broken_json_or_schema_errors_shows_them_inline(alice_client, make_paused_run):
    _, _, approval = make_paused_run(kind="tool_call", node_id="email")
    url = f"/approvals/{approval.pk}/decide/"

    broken = alice_client.post(url, {"decision": "approve", "edited": '{"to": '}, **HTMX)
    assert "Not valid JSON" in broken.content.decode()

    invalid = alice_client.post(url, {"decision": "approve", "edited": '{"to": "x@y.z"}'}, **HTMX)
    html = invalid.content.decode()
    assert "arguments: &#x27;body&#x27; is a required property" in html
    assert "{&quot;to&quot;: &quot;x@y.z&quot;}" in html  # the user's text is kept
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


def test_edit_then_approve_from_the_form(alice_client, make_paused_run):
    _, _, approval = make_paused_run(kind="tool_call", node_id="email")
    arguments = {"to": "boss@example.com", "subject": "t", "body": "Hello"}

    response = alice_client.post(
        f"/approvals/{approval.pk}/decide/",
        {"decision": "approve", "edited": json.dumps(arguments)},
        **HTMX,
    )

    assert "Approved with your edit" in response.content.decode()
    approval.refresh_from_db()
    assert approval.edited_payload == {"tool": "send_email", "arguments": arguments}


def test_deciding_what_someone_else_decided_says_who_and_when(
    alice_client, make_paused_run, admin_user
):
    _, _, approval = make_paused_run()
    decide_approval(approval.pk, admin_user, approve=False, comment="No budget")

    response = alice_client.post(
        f"/approvals/{approval.pk}/decide/", {"decision": "approve"}, **HTMX
    )

    assert "Already rejected by admin at " in response.content.decode()
    assert ApprovalRequest.objects.get(pk=approval.pk).decided_by == admin_user


def test_bulk_approve_and_bulk_reject(alice_client, make_paused_run):
    approvals = [make_paused_run()[2] for _ in range(4)]
    ids = [a.pk for a in approvals]

    approved = alice_client.post(
        "/approvals/bulk/", {"decision": "approve", "ids": ids[:2]}, **HTMX
    )
    assert "Approved 2 requests." in approved.content.decode()
    no_reason = alice_client.post(
        "/approvals/bulk/", {"decision": "reject", "ids": ids[2:]}, **HTMX
    )
    assert "A rejection needs a reason." in no_reason.content.decode()
    rejected = alice_client.post(
        "/approvals/bulk/", {"decision": "reject", "ids": ids[1:], "comment": "Stale"}, **HTMX
    )

    html = rejected.content.decode()
    assert "Rejected 2 requests." in html
    assert f"#{ids[1]}: Already approved by alice" in html
    assert f'id="approval-{ids[2]}" hx-swap-oob="delete"' in html
    statuses = dict(ApprovalRequest.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert [statuses[pk] for pk in ids] == ["approved", "approved", "rejected", "rejected"]


def test_bulk_skips_requests_the_user_cannot_see(client, make_paused_run, charlie, deciders):
    _, _, approval = make_paused_run()
    client.force_login(charlie)
    response = client.post(
        "/approvals/bulk/", {"decision": "approve", "ids": [approval.pk]}, **HTMX
    )
    assert f"#{approval.pk}: not found." in response.content.decode()
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.PENDING


# --- detail and audit -----------------------------------------------------------------------


def test_detail_page_shows_the_decision_history_and_the_diff(alice_client, make_paused_run, alice):
    _, _, approval = make_paused_run(kind="tool_call", node_id="email")
    edited = {
        "tool": "send_email",
        "arguments": {"to": "boss@example.com", "subject": "t", "body": "Hello"},
    }
    decide_approval(
        approval.pk, alice, approve=True, comment="Send to the boss", edited_payload=edited
    )

    html = alice_client.get(f"/approvals/{approval.pk}/").content.decode()

    assert "Approved</span>\n        by <strong>alice</strong>" in html
    assert "Send to the boss" in html
    assert "<code>arguments.to</code>" in html
    assert "&quot;team@example.com&quot;" in html and "&quot;boss@example.com&quot;" in html
    assert "Requested" in html and "outcome: approved" in html
    assert 'data-action="approve"' not in html  # nothing left to decide


def test_detail_page_of_a_pending_request_has_plain_forms(alice_client, make_paused_run):
    _, _, approval = make_paused_run()
    html = alice_client.get(f"/approvals/{approval.pk}/").content.decode()
    assert 'data-action="approve"' in html and "hx-post" not in html


def test_admin_shows_a_decided_request_read_only(
    client, make_paused_run, alice, admin_user, deciders
):
    _, _, approval = make_paused_run()
    decide_approval(approval.pk, alice, approve=False, comment="No")
    client.force_login(admin_user)
    url = f"/admin/approvals/approvalrequest/{approval.pk}/change/"

    html = client.get(url).content.decode()
    assert 'name="comment"' not in html and 'name="due_at_0"' not in html
    assert "approval.decided" in html

    client.post(url, {"comment": "Yes", "due_at_0": "2030-01-01", "due_at_1": "00:00"})
    approval.refresh_from_db()
    assert approval.comment == "No" and approval.due_at is None
    assert client.get(f"/admin/approvals/approvalrequest/{approval.pk}/delete/").status_code == 403


def test_admin_may_adjust_the_deadline_of_a_pending_request_only(
    client, make_paused_run, admin_user
):
    _, _, approval = make_paused_run()
    client.force_login(admin_user)
    url = f"/admin/approvals/approvalrequest/{approval.pk}/change/"
    html = client.get(url).content.decode()
    assert 'name="due_at_0"' in html
    assert 'name="comment"' not in html and 'name="status"' not in html
