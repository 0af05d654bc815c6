"""In Chromium: demo-approval pauses, its request appears live in an open inbox, it is approved
there with the keyboard, and the open run page shows the run finish, all without a reload.

WebSockets need an ASGI server, so the pages are served by a Daphne process (with static
files, see tests/approvals/asgi.py) that opens the test database, like the Celery worker.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.test import Client
from playwright.sync_api import expect, sync_playwright

from approvals.models import ApprovalRequest
from runs import engine
from teams.models import Workflow
from tests.approvals.conftest import grant_decide

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def asgi_server(transactional_db):
    """Daphne on a free port, serving HTTP and WebSockets from the test database."""
    port = _free_port()
    log_path = Path(settings.VAR_DIR) / f"test-{settings.TEST_ID}-daphne-approvals.log"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BATON_TEST_WORKER": "1"}
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "tests.approvals.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"daphne exited early; see {log_path}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"daphne not up; see {log_path}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
    asgi_server, celery_worker, alice
):
    call_command("load_demo", verbosity=0)
    workflow = Workflow.objects.get(slug="demo-approval")
    workflow.owner = alice
    workflow.save(update_fields=["owner"])
    grant_decide(alice)
    client = Client()
    client.force_login(alice)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=asgi_server)
            context.add_cookies(
                [
                    {
                        "name": settings.SESSION_COOKIE_NAME,
                        "url": asgi_server,
                        "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                    }
                ]
            )
            context.set_default_timeout(30_000)
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
        finally:
            browser.close()
            # Code inside sync_playwright runs in a greenlet with its own context, hence its own
            # database connection, which pytest-django does not close (PostgreSQL then refuses
            # to drop the test database).
            connections.close_all()

    approval = ApprovalRequest.objects.get(run=run)
    assert approval.status == ApprovalRequest.APPROVED and approval.decided_by == alice
