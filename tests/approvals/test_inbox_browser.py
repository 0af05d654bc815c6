"""In Chromium: demo-approval pauses, its request appears live in an open inbox, it is approved
there with the keyboard, and the open run page shows the run finish, all without a reload.

WebSockets need an ASGI server, so the pages are served by Daphne (tests/browser.py), which
opens the test database like the Celery worker.
"""

import pytest
from django.core.management import call_command
from playwright.sync_api import expect

from approvals.models import ApprovalRequest
from runs import engine
from teams.models import Workflow
from tests.approvals.conftest import grant_decide
from tests.browser import signed_in_context

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def _socket_open(page, selector: str) -> None:
    page.wait_for_function(
        """(selector) => {
            const el = document.querySelector(selector);
            const data = el && el["htmx-internal-data"];
            return !!(data && data.webSocket && data.webSocket.socket
                      && data.webSocket.socket.readyState === 1);
        }""",
        arg=selector,
    )


def test_approving_live_in_the_inbox_lets_the_run_finish_on_its_open_page(
    asgi_server, celery_worker, alice, chromium
):
    call_command("load_demo", verbosity=0)
    workflow = Workflow.objects.get(slug="demo-approval")
    workflow.owner = alice
    workflow.save(update_fields=["owner"])
    grant_decide(alice)
    context = signed_in_context(chromium, asgi_server.url, alice)
    inbox = context.new_page()
    inbox.goto("/approvals/")
    expect(inbox.locator("#approval-items .approval")).to_have_count(0)
    _socket_open(inbox, "#approval-list")
    inbox.evaluate("window.__notReloaded = true")

    run = engine.start_run(workflow.latest_version(), {"topic": "live approvals"}, alice)
    run_page = context.new_page()
    run_page.goto(f"/runs/{run.pk}/")
    _socket_open(run_page, "#run-live")
    run_page.evaluate("window.__notReloaded = true")

    card = inbox.locator("#approval-items .approval")
    expect(card).to_have_count(1)
    expect(card).to_contain_text("send_email")
    expect(card).to_contain_text("team@example.com")
    expect(inbox.locator("#approvals-badge")).to_have_text("1")
    expect(run_page.get_by_test_id("run-status")).to_have_text("Waiting for approval")

    inbox.locator("h1").click()
    inbox.keyboard.press("j")
    expect(card).to_have_class("card approval is-current")
    inbox.keyboard.press("a")

    expect(card).to_have_count(0)
    expect(inbox.locator("#approvals-flash")).to_contain_text("Approved")
    expect(inbox.locator("#approvals-badge")).to_have_text("0")
    expect(run_page.get_by_test_id("run-status")).to_have_text("Succeeded")
    assert inbox.evaluate("window.__notReloaded") is True
    assert run_page.evaluate("window.__notReloaded") is True

    approval = ApprovalRequest.objects.get(run=run)
    assert approval.status == ApprovalRequest.APPROVED and approval.decided_by == alice
