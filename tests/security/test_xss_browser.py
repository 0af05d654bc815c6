"""Untrusted text never runs in the browser.

XSS payloads (tests/security/payloads.py) are stored in every place Baton shows text it did not
write: workflow names and descriptions, role, agent and tool names, node ids, labels and
prompts, run input, agent output (Markdown), tool arguments and results, approval titles,
payloads and comments, error messages, cost labels. Headless Chromium then visits every page
that shows them, including the fragments the sockets push while a page is open, the editor's
side panel and pages that echo the query string, and checks that nothing ran: window.__xss is
unset, no dialog opened, and the DOM holds no element the text could have smuggled in (event
handler attributes, javascript: URLs, script elements carrying the payload).

Every world's pages are visited: the one holding all payloads at once, where the columns cut
it (PostgreSQL refuses longer values), and one per payload, which holds its payload whole in
every column. Each visit also checks that the page shows the text it is meant to show, so a
page that stopped showing it cannot pass unnoticed.

Pages are served by Daphne from the test database (tests/browser.py): they need their sockets.
"""

import threading
from collections.abc import Iterable
from urllib.parse import quote

import pytest
from django.contrib.auth.models import Permission
from django.db import connections, transaction
from django.utils import timezone

from runs import events, hooks
from runs.models import Run, Step
from teams.models import WorkflowVersion
from tests.browser import signed_in_context
from tests.security.payloads import (
    COMBINED,
    MARKDOWN,
    XSS_PAYLOADS,
    World,
    build_world,
    fit,
    world_spec,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

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


# Every text the page holds as data or shows: text, attribute and form values, the strings of
# JSON data blocks and of the editor's graph.
SHOWN_TEXT = """() => {
    const parts = [document.documentElement.textContent];
    const collect = (value) => {
        if (typeof value === 'string') parts.push(value);
        else if (value && typeof value === 'object')
            for (const [key, item] of Object.entries(value)) { parts.push(key); collect(item); }
    };
    for (const el of document.querySelectorAll('*')) {
        for (const attr of el.attributes) parts.push(attr.value);
        if (typeof el.value === 'string') parts.push(el.value);
        if (el.localName === 'script' && el.type === 'application/json')
            collect(JSON.parse(el.textContent));
    }
    if (window.batonEditor) window.batonEditor.graph.cy.elements().forEach(e => collect(e.data()));
    return parts;
}"""


def revise(world: World, user, revision: str, *, publish: bool = False) -> None:
    """A draft, or a published version, that differs from the world's first version."""
    spec = world_spec(world.text, world.agent.name, world.tool.name, revision)
    if publish:
        note = fit(WorkflowVersion, "note", world.text)
        world.workflow.publish(user=user, note=note, spec=spec)
    else:
        world.workflow.draft = spec
        world.workflow.save(update_fields=["draft"])


@pytest.fixture
def worlds(alice, bob):
    """One world holding every payload at once, and one per payload; each with a draft that
    differs from its first version (the first one also has a second version), for the diffs."""
    alice.user_permissions.add(Permission.objects.get(codename="decide_approvalrequest"))
    main = build_world(alice, COMBINED, members=[bob], slug="xss-all")
    revise(main, alice, " v2", publish=True)
    revise(main, alice, " draft")
    singles = []
    for index, payload in enumerate(XSS_PAYLOADS):
        world = build_world(alice, payload, slug=f"xss-{index}", markdown=payload)
        revise(world, alice, " draft")
        columns = (
            world.role.name,
            world.agent.name,
            world.agent.model,
            world.tool.name,
            world.workflow.name,
            world.version.note,
            world.run.blocked_on,
            world.agent_step.node_id,
            world.tool_step.node_id,
            world.waiting_step.node_id,
            world.decided.title,
        )
        # Only the cost label (40 characters) is too short for a payload.
        assert all(payload in column for column in columns), f"payload {index} was cut"
        singles.append(world)
    return main, singles


def world_pages(world: World) -> list[str]:
    """The pages of one world: its run, a fork of its step, its approvals, its run's costs, its
    versions and the diff of its draft, its run in the editor."""
    run, slug = world.run, world.workflow.slug
    return [
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/steps/{world.agent_step.pk}/fork/",
        f"/approvals/{world.pending.pk}/",
        f"/approvals/{world.tool_approval.pk}/",
        f"/approvals/{world.decided.pk}/",
        f"/costs/runs/{run.pk}/breakdown/",
        f"/workflows/{slug}/versions/",
        f"/workflows/{slug}/diff/?a=1&b=draft",
        f"/runs/editor/{slug}/",
    ]


@pytest.fixture
def browser(asgi_server, alice, chromium):
    page = signed_in_context(chromium, asgi_server.url, alice).new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield Browser(page, dialogs, errors)
    finally:
        events.flush()


class Browser:
    def __init__(self, page, dialogs: list[str], errors: list[str]):
        self.page, self.dialogs, self.errors = page, dialogs, errors
        self.visited: list[str] = []

    def visit(
        self, url: str, expect_status: tuple[int, ...] = (200,), shows: Iterable[str] = ()
    ) -> None:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status in expect_status, (
            f"{url}: {response.status if response else 'no response'}"
        )
        self.settle()
        self.check(url, shows)

    def settle(self) -> None:
        """Let htmx, the sockets and any image error handler run before looking."""
        self.page.wait_for_load_state("networkidle")
        self.page.wait_for_timeout(150)

    def check(self, where: str, shows: Iterable[str] = ()) -> None:
        """Nothing ran and nothing was smuggled in; and the page shows each of `shows` whole."""
        self.visited.append(where)
        found = self.page.evaluate(DOM_CHECK)
        assert found["xss"] is None, f"a payload ran on {where}"
        assert not self.dialogs, f"a dialog opened on {where}: {self.dialogs}"
        assert not found["bad"], f"markup from a payload on {where}: {found['bad'][:5]}"
        if shows:
            shown = self.page.evaluate(SHOWN_TEXT)
            missing = [text for text in shows if not any(text in part for part in shown)]
            assert not missing, f"{where} does not show {missing[:3]}"

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
    main, _ = worlds
    slug = main.workflow.slug

    # Lists and reports: every world at once.
    browser.visit("/workflows/", shows=XSS_PAYLOADS)
    assert "{{7*7}}" in browser.page.inner_text("main"), "template syntax shown as text"
    for url in (
        "/runs/",
        "/approvals/",
        "/costs/",
        "/costs/?bucket=week",
        f"/costs/?workflow={slug}",
        "/runs/new/",
        f"/runs/new/?workflow={slug}",
    ):
        browser.visit(url, shows=XSS_PAYLOADS)
    browser.visit("/workflows/gallery/")

    # The pages of the world holding every payload at once. Where a column cut its text, a
    # page may show only the start of it, the first payload; each payload's own world below
    # shows it whole on every one of these pages.
    for url in (
        *world_pages(main),
        f"/workflows/{slug}/diff/?a=1&b=2",
        f"/workflows/{slug}/diff/?a=2&b=draft",
        f"/runs/editor/{slug}/?version=1",
    ):
        browser.visit(url, shows=XSS_PAYLOADS[:1])

    # Query strings echoed back into forms and messages (reflected XSS).
    for payload in XSS_PAYLOADS:
        q = quote(payload)
        for url in (
            f"/runs/?q={q}&started_from={q}",
            f"/costs/?model={q}&start={q}",
            f"/approvals/?workflow={q}&run={q}",
        ):
            browser.visit(url, expect_status=(200, 400))


@pytest.mark.timeout(600)  # some 160 pages, each waited on until the network is idle
def test_each_payload_whole_never_runs_on_the_pages_of_its_world(browser, worlds):
    _, singles = worlds
    for world in singles:
        for url in world_pages(world):
            browser.visit(url, shows=[world.text])
    assert len(browser.visited) == len(XSS_PAYLOADS) * len(world_pages(singles[0]))


def test_the_editor_and_its_panel_never_run_untrusted_text(browser, worlds):
    main, singles = worlds
    page = browser.page
    for world in (main, *singles):
        shows = XSS_PAYLOADS[:1] if world is main else [world.text]
        browser.visit(f"/workflows/{world.workflow.slug}/edit/", shows=shows)
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
                browser.check(f"the editor panel of {target} {element_id!r}", shows)


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
