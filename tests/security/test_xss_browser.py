"""Untrusted text never runs in the browser.

XSS payloads (tests/security/payloads.py) are stored in every place Baton shows text it did not
write: workflow names and descriptions, role, agent and tool names, node ids, labels and
prompts, run input, agent output (Markdown), tool arguments and results, approval titles,
payloads and comments, error messages, cost labels. Headless Chromium then visits every page
that shows them, including the fragments the sockets push while a page is open, the editor's
side panel and pages that echo the query string, and checks that nothing ran: window.__xss is
unset, no dialog opened, and the DOM holds no element the text could have smuggled in (event
handler attributes, javascript: URLs, script elements carrying the payload).

Pages are served by Daphne from the test database (pytest-django's live_server speaks WSGI
only, and the pages need their WebSockets), as in tests/runs/test_dashboard_browser.py.
"""

import socket
import threading
from functools import partial
from urllib.parse import quote

import pytest
from channels.testing.live import make_application, set_database_connection
from daphne.testing import DaphneProcess
from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.db import connections, transaction
from django.test import Client
from django.utils import timezone
from playwright.sync_api import sync_playwright

from runs import events, hooks
from runs.models import Run, Step
from tests.security.payloads import COMBINED, MARKDOWN, XSS_PAYLOADS, build_world, world_spec

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# What the payloads could leave behind if any of them were parsed as markup.
DOM_CHECK = """() => {
    const bad = [];
    const urlAttrs = ['href', 'src', 'xlink:href', 'action', 'formaction', 'data', 'poster'];
    const hxUrls = ['hx-get', 'hx-post', 'hx-put', 'hx-patch', 'hx-delete', 'hx-push-url',
                    'hx-replace-url'];
    for (const el of document.querySelectorAll('*')) {
        for (const attr of el.attributes) {
            const name = attr.name.toLowerCase(), value = attr.value || '';
            if (name.startsWith('on') && value.includes('__xss'))
                bad.push(`${el.localName}[${name}]`);
            if (urlAttrs.includes(name) && /^\\s*javascript:/i.test(value))
                bad.push(`${el.localName}[${name}=${value.slice(0, 40)}]`);
            if (name === 'srcdoc') bad.push(`${el.localName}[srcdoc]`);
            // htmx runs hx-on handlers, js: values and [conditions] of triggers; URLs that
            // carry the text percent-encoded in a query string are harmless.
            const hx = name.replace(/^data-/, '');
            if (hx.startsWith('hx-') && !hxUrls.includes(hx) && value.includes('__xss'))
                bad.push(`${el.localName}[${name}]`);
        }
        // json_script data blocks hold the text as JSON with < > & escaped; a script element
        // of any other type carrying the payload was smuggled in.
        if (el.localName === 'script' && el.textContent.includes('__xss')
                && (el.type !== 'application/json' || el.textContent.includes('<')))
            bad.push('script');
        if (el.localName === 'style' && el.textContent.includes('__xss')) bad.push('style');
    }
    return {xss: window.__xss === undefined ? null : String(window.__xss), bad};
}"""


class AsgiServer:
    """Daphne serving Baton and its static files from the test database, in a forked child."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: DaphneProcess | None = None

    def start(self) -> None:
        connections.close_all()  # the forked child must not share this process's connection
        self.process = DaphneProcess(
            "127.0.0.1",
            partial(make_application, static_wrapper=ASGIStaticFilesHandler),
            setup=set_database_connection,
            port=self.port,
        )
        self.process.start()
        if not self.process.ready.wait(timeout=60):
            self.stop()
            raise TimeoutError("daphne did not start")
        if not self.process.errors.empty():
            raise RuntimeError(self.process.errors.get()[1])

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process is not None and self.process.is_alive():
            # Still there: pytest would wait for this child forever when it exits.
            self.process.kill()
            self.process.join(10)


@pytest.fixture
def worlds(alice, bob):
    """One world holding every payload at once, and one per payload (so short fields, like
    names, hold each payload whole)."""
    alice.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    main = build_world(alice, COMBINED, members=[bob], slug="xss-all")
    # A second version and a draft that differ from the first, for the versions and diffs.
    spec = world_spec(COMBINED + " v2", main.agent.name, main.tool.name)
    main.workflow.publish(user=alice, note=COMBINED[:500], spec=spec)
    main.workflow.draft = world_spec(COMBINED + " draft", main.agent.name, main.tool.name)
    main.workflow.save(update_fields=["draft"])
    singles = [
        build_world(alice, payload, slug=f"xss-{index}", markdown=payload)
        for index, payload in enumerate(XSS_PAYLOADS)
    ]
    return main, singles


@pytest.fixture
def server(transactional_db):
    """Started before any data is made: forking while the event publisher thread works could
    leave one of its locks held in Daphne's process."""
    server = AsgiServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def browser(server, alice):
    client = Client()
    client.force_login(alice)
    try:
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                context = chromium.new_context(base_url=server.url)
                context.add_cookies(
                    [
                        {
                            "name": settings.SESSION_COOKIE_NAME,
                            "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                            "url": server.url,
                        }
                    ]
                )
                context.set_default_timeout(30_000)
                page = context.new_page()
                dialogs: list[str] = []
                page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                yield Browser(page, dialogs, errors)
            finally:
                chromium.close()
                # Playwright's greenlet has its own database connection; close it.
                connections.close_all()
    finally:
        events.flush()


class Browser:
    def __init__(self, page, dialogs: list[str], errors: list[str]):
        self.page, self.dialogs, self.errors = page, dialogs, errors
        self.visited: list[str] = []

    def visit(self, url: str, expect_status: tuple[int, ...] = (200,)) -> None:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status in expect_status, (
            f"{url}: {response.status if response else 'no response'}"
        )
        self.settle()
        self.check(url)

    def settle(self) -> None:
        """Let htmx, the sockets and any image error handler run before looking."""
        self.page.wait_for_load_state("networkidle")
        self.page.wait_for_timeout(150)

    def check(self, where: str) -> None:
        self.visited.append(where)
        found = self.page.evaluate(DOM_CHECK)
        assert found["xss"] is None, f"a payload ran on {where}"
        assert not self.dialogs, f"a dialog opened on {where}: {self.dialogs}"
        assert not found["bad"], f"markup from a payload on {where}: {found['bad'][:5]}"

    def socket_open(self, selector: str) -> None:
        self.page.wait_for_function(
            """(selector) => {
                const data = document.querySelector(selector)["htmx-internal-data"];
                return !!(data && data.webSocket && data.webSocket.socket
                          && data.webSocket.socket.readyState === 1);
            }""",
            arg=selector,
        )


def in_a_thread(function):
    """Playwright's sync API runs an event loop in this thread, and Channels' async_to_sync
    (which the approvals publish with, on commit) refuses to run beside one: act elsewhere."""
    result = []

    def target():
        try:
            result.append(function())
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    return result[0]


def open_request(world):
    with transaction.atomic():
        step = Step.objects.create(
            run=world.run,
            node_id=world.tool_step.node_id,
            kind="tool",
            iteration=1,
            status=Step.WAITING,
        )
        return hooks.request_approval(
            run=world.run,
            step=step,
            kind="escalation",
            title=COMBINED,
            payload={"output": COMBINED},
            context={
                "reason": COMBINED,
                "previous_outputs": [{"node": COMBINED, "output": COMBINED}],
            },
            tool_call=None,
            due_in_s=60,
            default_outcome="reject",
            approver_group=None,
        )


def test_untrusted_text_never_runs_on_any_page(browser, worlds):
    main, singles = worlds
    run, slug = main.run, main.workflow.slug

    # Lists and reports: every world at once.
    browser.visit("/workflows/")
    assert "{{7*7}}" in browser.page.inner_text("main"), "template syntax shown as text"
    for url in (
        "/runs/",
        "/approvals/",
        "/costs/",
        "/costs/?bucket=week",
        f"/costs/?workflow={slug}",
        f"/costs/runs/{run.pk}/breakdown/",
        "/workflows/gallery/",
        "/runs/new/",
        f"/runs/new/?workflow={slug}",
    ):
        browser.visit(url)

    # The main world's pages.
    for url in (
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/steps/{main.agent_step.pk}/fork/",
        f"/approvals/{main.pending.pk}/",
        f"/approvals/{main.tool_approval.pk}/",
        f"/approvals/{main.decided.pk}/",
        f"/workflows/{slug}/versions/",
        f"/workflows/{slug}/diff/?a=1&b=2",
        f"/workflows/{slug}/diff/?a=2&b=draft",
        f"/runs/editor/{slug}/",
        f"/runs/editor/{slug}/?version=1",
    ):
        browser.visit(url)

    # Each payload whole in every field, one world at a time.
    for world in singles:
        browser.visit(f"/runs/{world.run.pk}/")
        browser.visit(f"/approvals/{world.pending.pk}/")
        browser.visit(f"/workflows/{world.workflow.slug}/diff/?a=1&b=draft")

    # Query strings echoed back into forms and messages (reflected XSS).
    for payload in XSS_PAYLOADS:
        q = quote(payload)
        for url in (
            f"/runs/?q={q}&started_from={q}",
            f"/costs/?model={q}&start={q}",
            f"/approvals/?workflow={q}&run={q}",
        ):
            browser.visit(url, expect_status=(200, 400))
    assert len(browser.visited) > 100


def test_the_editor_and_its_panel_never_run_untrusted_text(browser, worlds):
    main, singles = worlds
    page = browser.page
    for world in (main, *singles[:6]):
        browser.visit(f"/workflows/{world.workflow.slug}/edit/")
        page.wait_for_function("document.getElementById('editor').dataset.ready === 'true'")
        node_ids = page.evaluate("window.batonEditor.graph.cy.nodes().map(n => n.id())")
        edge_ids = page.evaluate("window.batonEditor.graph.cy.edges().map(e => e.id())")
        assert len(node_ids) == 3 and len(edge_ids) == 2
        for target, ids in (("node", node_ids), ("edge", edge_ids), ("workflow", [None])):
            for element_id in ids:
                page.evaluate(
                    "([t, id]) => window.batonEditor.panel.show(t, id)", [target, element_id]
                )
                page.wait_for_function("document.getElementById('panel-body').dataset.key")
                browser.settle()
                browser.check(f"the editor panel of {target} {element_id!r}")


def test_live_fragments_never_run_untrusted_text(browser, worlds, alice):
    main, _ = worlds
    run, page = main.run, browser.page

    # The inbox: a new request's card arrives over its socket.
    browser.visit("/approvals/")
    browser.socket_open("#approval-list")
    approval = in_a_thread(lambda: open_request(main))
    page.wait_for_selector(f"#approval-{approval.pk}", state="attached")
    browser.settle()
    browser.check("the inbox after a live card")

    # The runs list: a new run's row arrives over its socket.
    browser.visit("/runs/")
    browser.socket_open("#results")
    with transaction.atomic():
        new = Run.objects.create(
            workflow=main.workflow,
            version=main.version,
            input={"topic": COMBINED},
            started_by=alice,
            error=COMBINED,
        )
        events.append_event(new.pk, "run.created", {"status": new.status})
    page.wait_for_selector(f"#results a[href='/runs/{new.pk}/']", state="attached")
    browser.settle()
    browser.check("the runs list after a live insert")

    # The run page: events, streamed tokens and the new state of a step and of the run.
    browser.visit(f"/runs/{run.pk}/")
    browser.socket_open("#run-live")
    seen = page.evaluate("document.querySelectorAll('#event-log li').length")
    step = Step.objects.get(pk=main.waiting_step.pk)
    now = timezone.now()
    with transaction.atomic():
        Step.objects.filter(pk=step.pk).update(status=Step.RUNNING, started_at=now)
        events.append_event(run.pk, "step.started", {"step_id": step.pk, "node_id": step.node_id})
    in_a_thread(lambda: events.publish_tokens(run.pk, step.pk, COMBINED) or True)
    with transaction.atomic():
        Step.objects.filter(pk=step.pk).update(
            status=Step.FAILED, output_text=MARKDOWN, error=COMBINED, finished_at=now
        )
        Run.objects.filter(pk=run.pk).update(status=Run.FAILED, error=COMBINED, result=MARKDOWN)
        events.append_events(
            run.pk,
            [
                (
                    "tool.called",
                    {
                        "step_id": step.pk,
                        "tool": COMBINED,
                        "arguments": COMBINED,
                        "result": COMBINED,
                        "error": COMBINED,
                    },
                ),
                ("step.failed", {"step_id": step.pk, "node_id": step.node_id, "error": COMBINED}),
                ("run.status", {"status": Run.FAILED, "error": COMBINED}),
                ("run.totals", {"tokens": 999, "cost": "0.5"}),
            ],
        )
    page.wait_for_function(
        "(n) => document.querySelectorAll('#event-log li').length >= n", arg=seen + 5
    )
    browser.settle()
    browser.check("the run page after live updates")
