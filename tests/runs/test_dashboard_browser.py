"""In Chromium, against Daphne and a real Celery worker: start demo-fanout from the start form and
watch it finish without a reload; a finished run's page shows the same picture; a page that lost
its server mid-run converges, with every event applied exactly once and in order.

WebSockets need an ASGI server: the pages are served by Daphne (tests/browser.py), which opens the
test database like the Celery worker.
"""

import re

import pytest
from django.core.management import call_command
from playwright.sync_api import expect

from runs import engine
from runs.models import Run
from teams.models import Workflow
from tests.browser import signed_in_context

pytestmark = [pytest.mark.browser, pytest.mark.integration]

FANOUT_NODES = ("fan_out", "market", "technical", "risks", "gather", "synthesis")


@pytest.fixture
def browser_context(asgi_server, admin_user, chromium):
    return signed_in_context(chromium, asgi_server.url, admin_user)


def socket_open(page, selector: str = "#run-live") -> None:
    page.wait_for_function(
        """(selector) => {
            const data = document.querySelector(selector)["htmx-internal-data"];
            return !!(data && data.webSocket && data.webSocket.socket
                      && data.webSocket.socket.readyState === 1);
        }""",
        arg=selector,
    )


def record_costs(page) -> None:
    """Note every cost the header shows, to see it rise while the page stays put."""
    page.evaluate(
        """() => {
            window.__costs = [];
            setInterval(() => {
                const cost = document.querySelector("[data-testid=run-cost]").dataset.cost;
                if (window.__costs.at(-1) !== cost) window.__costs.push(cost);
            }, 25);
        }"""
    )


def picture(page) -> dict:
    """What a user sees of a run: status, figures, node colours, steps, result."""
    return page.evaluate(
        """() => ({
            status: document.querySelector("[data-testid=run-status]").textContent.trim(),
            tokens: document.querySelector("[data-testid=run-tokens]").textContent.trim(),
            cost: document.querySelector("[data-testid=run-cost]").textContent.trim(),
            nodes: Object.fromEntries([...document.querySelectorAll(".gnode")]
                .map(n => [n.dataset.node, n.dataset.status])),
            steps: [...document.querySelectorAll("#steps > .step")].map(s =>
                s.dataset.node + ":" + s.querySelector("[data-testid=step-status]").textContent),
            result: document.querySelector("#run-result").textContent.replace(/\\s+/g, " "),
        })"""
    )


def applied_seqs(page) -> list[int]:
    return page.evaluate(
        "() => [...document.querySelectorAll('#event-log li')].map(li => +li.dataset.seq)"
    )


def test_demo_fanout_started_from_the_ui_finishes_live_and_reloads_identically(
    browser_context, celery_worker, admin_user
):
    call_command("load_demo", verbosity=0)
    # Held at the start by the global stop switch, so the page is open before anything runs.
    engine.set_stop_everything(True, admin_user)

    errors = []
    runs_list = browser_context.new_page()
    runs_list.goto("/runs/")
    socket_open(runs_list, "#results")
    runs_list.evaluate("window.__notReloaded = true")
    page = browser_context.new_page()
    page.on("pageerror", lambda error: errors.append(error))
    page.goto("/runs/new/?workflow=demo-fanout")
    page.get_by_label("Topic").fill("durable agent teams")
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url(re.compile(r"/runs/\d+/$"))
    run = Run.objects.get()
    assert run.input == {"topic": "durable agent teams"}
    expect(page.get_by_test_id("run-status")).to_have_text("Paused")
    expect(page.get_by_test_id("run-cost")).to_have_text("$0.00")
    socket_open(page)
    page.evaluate("window.__notReloaded = true")
    record_costs(page)
    row = runs_list.locator(f"#run-rows > tr#run-row-{run.pk}")
    expect(row).to_have_attribute("data-status", "paused")

    engine.set_stop_everything(False, admin_user)
    engine.resume_run(run, admin_user)

    for node in FANOUT_NODES:
        expect(page.locator(f'.gnode[data-node="{node}"]')).to_have_attribute(
            "data-status", "succeeded", timeout=60_000
        )
    expect(page.get_by_test_id("run-status")).to_have_text("Succeeded")
    expect(page.get_by_test_id("run-cost")).not_to_have_text("$0.00")
    expect(page.locator("#steps > .step")).to_have_count(len(FANOUT_NODES))
    expect(page.get_by_test_id("run-result")).to_contain_text("durable agent teams")
    assert page.evaluate("window.__notReloaded") is True

    run.refresh_from_db()
    assert run.status == Run.SUCCEEDED and run.cost > 0
    expect(page.locator("#event-log li").last).to_have_attribute("data-seq", str(run.last_seq))
    assert applied_seqs(page) == list(range(1, run.last_seq + 1))
    live = picture(page)
    assert live["cost"] != "$0.00" and int(live["tokens"]) == run.total_tokens
    costs = [float(c) for c in page.evaluate("window.__costs")]
    assert costs[0] == 0 and costs[-1] == float(run.cost) and costs == sorted(costs)
    assert not errors
    expect(row).to_have_attribute("data-status", "succeeded")
    expect(row).to_contain_text(live["cost"])
    assert runs_list.evaluate("window.__notReloaded") is True

    fresh = browser_context.new_page()
    fresh.goto(f"/runs/{run.pk}/")
    assert picture(fresh) == live
    assert applied_seqs(fresh) == applied_seqs(page)


def test_a_page_that_lost_its_server_mid_run_converges_with_each_event_once(
    browser_context, asgi_server, celery_worker, admin_user
):
    call_command("load_demo", verbosity=0)
    version = Workflow.objects.get(slug="demo-fanout").latest_version()
    engine.set_stop_everything(True, admin_user)
    run = engine.start_run(version, {"topic": "lossless streams"}, admin_user)

    page = browser_context.new_page()
    # Only the socket may catch up here: no polling, and reconnect attempts every half second.
    page.route(re.compile(r"/events/"), lambda route: route.abort())
    page.goto(f"/runs/{run.pk}/")
    socket_open(page)
    page.evaluate("window.__notReloaded = true; htmx.config.wsReconnectDelay = () => 500")
    run.refresh_from_db()
    assert applied_seqs(page) == list(range(1, run.last_seq + 1))

    asgi_server.stop()  # the connection drops; the run goes on without the page
    engine.set_stop_everything(False, admin_user)
    engine.resume_run(run, admin_user)
    run = engine.wait_for(run, timeout_s=60)
    assert run.status == Run.SUCCEEDED
    asgi_server.start()

    for node in FANOUT_NODES:
        expect(page.locator(f'.gnode[data-node="{node}"]')).to_have_attribute(
            "data-status", "succeeded", timeout=60_000
        )
    expect(page.get_by_test_id("run-status")).to_have_text("Succeeded")
    expect(page.locator("#event-log li").last).to_have_attribute("data-seq", str(run.last_seq))
    assert applied_seqs(page) == list(range(1, run.last_seq + 1))
    assert page.evaluate("window.__notReloaded") is True

    fresh = browser_context.new_page()
    fresh.goto(f"/runs/{run.pk}/")
    assert picture(fresh) == picture(page)


def test_without_a_socket_the_page_polls_until_the_run_is_over(
    browser_context, celery_worker, admin_user
):
    call_command("load_demo", verbosity=0)
    version = Workflow.objects.get(slug="demo-fanout").latest_version()
    engine.set_stop_everything(True, admin_user)
    run = engine.start_run(version, {"topic": "polling"}, admin_user)

    page = browser_context.new_page()
    # A proxy that refuses WebSockets: every socket is closed as soon as it opens.
    page.route_web_socket(re.compile(r"/ws/"), lambda ws: ws.close(code=1008, reason="no"))
    polls = []
    page.on("response", lambda r: polls.append(r.status) if "/events/" in r.url else None)
    page.goto(f"/runs/{run.pk}/")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_function("() => window.BatonLive.polling === true")

    engine.set_stop_everything(False, admin_user)
    engine.resume_run(run, admin_user)
    run = engine.wait_for(run, timeout_s=60)

    expect(page.get_by_test_id("run-status")).to_have_text("Succeeded")
    expect(page.locator("#event-log li").last).to_have_attribute("data-seq", str(run.last_seq))
    assert applied_seqs(page) == list(range(1, run.last_seq + 1))
    page.wait_for_timeout(2500)
    assert polls[-1] == 286 and polls.count(286) == 1  # polling stopped once caught up
    assert page.evaluate("window.__notReloaded") is True
    fresh = browser_context.new_page()
    fresh.goto(f"/runs/{run.pk}/")
    assert picture(fresh) == picture(page)
