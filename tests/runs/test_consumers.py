"""The run sockets through the real ASGI stack (session auth, routing) and the real Redis
channel layer: who may connect, replay after reconnect, and each event exactly once in order.

A message carries one or more consecutive events (the publisher renders what it has queued
as one batch): its seq marker is its last event's, and it holds every event's log line."""

import json
import re

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db.models import F
from django.test import Client

from orchestrator_site.asgi import application
from runs import events
from runs.models import Run, RunEvent, Step
from tests.factories import make_agent, make_workflow, pipeline_spec
from tests.runs.test_views import FANOUT, make_run

pytestmark = pytest.mark.django_db(transaction=True)

# How long a socket test waits for a message. One that arrives ends the wait at once; a loaded
# CI machine can take seconds to render and send it.
TIMEOUT = 20


@pytest.fixture
def workflow(alice, bob):
    make_agent("analyst")
    return make_workflow(FANOUT, owner=alice, members=[bob], slug="fanout", name="Fan-out team")


def headers_for(user) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    session = client.cookies[settings.SESSION_COOKIE_NAME].value
    return [
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode()),
        (b"origin", b"http://localhost"),
    ]


def socket(path: str, user=None) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path, headers=headers_for(user) if user else [])


def seq_of(html: str) -> int:
    return int(re.search(r'id="run-seq" data-seq="(\d+)"', html)[1])


def event_lines(html: str) -> list[int]:
    return [int(seq) for seq in re.findall(r'<li id="ev-(\d+)"', html)]


async def received_events(communicator: WebsocketCommunicator, through: int) -> list[int]:
    """The events of the messages received until the one that ends with seq `through`."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < through:
        html = await communicator.receive_from(TIMEOUT)
        lines = event_lines(html)
        assert lines and seq_of(html) == lines[-1], html
        seqs.extend(lines)
    return seqs


append = database_sync_to_async(events.append_event)


@database_sync_to_async
def store_silently(run_id: int, kind: str, payload: dict | None = None) -> RunEvent:
    """An event that is stored but whose publish has not arrived (yet)."""
    Run.objects.filter(pk=run_id).update(last_seq=F("last_seq") + 1)
    seq = Run.objects.values_list("last_seq", flat=True).get(pk=run_id)
    return RunEvent.objects.create(run_id=run_id, seq=seq, kind=kind, payload=payload or {})


publish = database_sync_to_async(events.publish_events)


# --- the run socket ----------------------------------------------------------------------


def test_outsider_and_anonymous_sockets_are_closed(workflow, alice, charlie):
    run = make_run(workflow, alice)

    async def scenario():
        for user in (charlie, None):
            communicator = socket(f"/ws/runs/{run.pk}/", user)
            connected, _ = await communicator.connect(TIMEOUT)
            assert not connected
        missing = socket(f"/ws/runs/{run.pk + 1000}/", alice)
        assert not (await missing.connect(TIMEOUT))[0]

    async_to_sync(scenario)()


def test_member_gets_the_missed_events_then_live_ones(workflow, alice, bob):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent")
    events.append_event(run.pk, "run.created", {})
    events.append_event(run.pk, "step.created", {"step_id": step.pk, "node_id": "a"})
    events.append_event(run.pk, "step.started", {"step_id": step.pk, "node_id": "a"})

    async def scenario():
        communicator = socket(f"/ws/runs/{run.pk}/", bob)
        assert (await communicator.connect(TIMEOUT))[0]
        await communicator.send_to(text_data=json.dumps({"last_seq": 1}))
        replayed = await communicator.receive_from(TIMEOUT)  # both events, rendered once
        assert event_lines(replayed) == [2, 3] and seq_of(replayed) == 3
        assert replayed.count(f'<article id="step-{step.pk}"') == 1
        assert replayed.count('id="gnode-a" class="gnode gnode-pending"') == 1

        await append(run.pk, "run.totals", {"tokens": 10, "cost": "0.01"})
        assert await received_events(communicator, through=4) == [4]
        await communicator.send_to(text_data=json.dumps({"last_seq": 0}))  # ignored: once only
        await database_sync_to_async(events.publish_tokens)(run.pk, step.pk, "Hello <wor")
        assert await communicator.receive_from(TIMEOUT) == (
            f'<pre id="stream-{step.pk}" class="stream" hx-swap-oob="true">Hello &lt;wor</pre>'
        )
        assert await communicator.receive_nothing(0.3)
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_reconnecting_with_last_seq_gets_exactly_the_missed_events_in_order(workflow, alice):
    run = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})
    events.append_event(run.pk, "run.status", {"status": "running"})

    async def scenario():
        first = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await first.connect(TIMEOUT))[0]
        await first.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(first, through=2) == [1, 2]
        await first.disconnect()  # the tab lost its connection mid-run

        for _ in range(3):
            await append(run.pk, "run.totals", {"tokens": 1, "cost": "0"})

        again = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await again.connect(TIMEOUT))[0]
        await again.send_to(text_data=json.dumps({"last_seq": 2}))
        assert await received_events(again, through=5) == [3, 4, 5]
        assert await again.receive_nothing(0.3)
        await append(run.pk, "run.status", {"status": "succeeded"})
        assert await received_events(again, through=6) == [6]
        assert await again.receive_nothing(0.3)
        await again.disconnect()

    async_to_sync(scenario)()


def test_events_published_before_the_hello_arrive_once(workflow, alice):
    run = make_run(workflow, alice)

    async def scenario():
        communicator = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await communicator.connect(TIMEOUT))[0]
        await append(run.pk, "run.created", {})  # published while the page has not said hello
        await append(run.pk, "run.status", {"status": "running"})
        await communicator.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(communicator, through=2) == [1, 2]
        assert await communicator.receive_nothing(0.5)
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_out_of_order_and_repeated_publishes_still_deliver_each_event_once_in_order(
    workflow, alice
):
    run = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})

    async def scenario():
        communicator = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await communicator.connect(TIMEOUT))[0]
        await communicator.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(communicator, through=1) == [1]
        second = await store_silently(run.pk, "run.status")
        third = await store_silently(run.pk, "run.totals")
        await publish([third])  # arrives before the publish of seq 2
        assert await received_events(communicator, through=3) == [2, 3]
        await publish([second])
        await publish([third])
        assert await communicator.receive_nothing(0.5)
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_a_bad_hello_replays_everything(workflow, alice):
    run = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})

    async def scenario():
        communicator = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await communicator.connect(TIMEOUT))[0]
        await communicator.send_to(text_data="not json")
        assert await received_events(communicator, through=1) == [1]
        await communicator.disconnect()

    async_to_sync(scenario)()


# --- the list socket ---------------------------------------------------------------------


def test_list_socket_needs_a_logged_in_user():
    async def scenario():
        assert not (await socket("/ws/runs/").connect(TIMEOUT))[0]

    async_to_sync(scenario)()


def test_list_socket_sends_only_rows_of_runs_the_user_may_see(workflow, alice, charlie):
    make_agent("scribe")
    theirs = make_workflow(pipeline_spec("scribe"), owner=charlie, slug="charlies")

    async def scenario():
        alices = socket("/ws/runs/", alice)
        charlies = socket("/ws/runs/", charlie)
        assert (await alices.connect(TIMEOUT))[0] and (await charlies.connect(TIMEOUT))[0]

        mine = await database_sync_to_async(make_run)(workflow, alice, status=Run.QUEUED)
        await append(mine.pk, "run.created", {})
        inserted = await alices.receive_from(TIMEOUT)
        assert inserted.startswith('<tbody hx-swap-oob="afterbegin:#run-rows">')
        assert f'<tr id="run-row-{mine.pk}"' in inserted
        await append(mine.pk, "run.totals", {"tokens": 5, "cost": "0.5"})
        updated = await alices.receive_from(TIMEOUT)
        assert updated.startswith(f'<tr id="run-row-{mine.pk}"')
        assert 'hx-swap-oob="true"' in updated
        assert await charlies.receive_nothing(0.3)

        other = await database_sync_to_async(make_run)(theirs, charlie)
        await append(other.pk, "run.created", {})
        assert f'run-row-{other.pk}"' in await charlies.receive_from(TIMEOUT)
        assert await alices.receive_nothing(0.3)
        await alices.disconnect()
        await charlies.disconnect()

    async_to_sync(scenario)()


def test_list_socket_inserts_only_new_runs_matching_the_filters(workflow, alice):
    async def scenario():
        failed_only = socket("/ws/runs/?status=failed", alice)
        later_page = socket("/ws/runs/?inserts=0", alice)
        everything = socket("/ws/runs/?workflow=fanout", alice)
        for communicator in (failed_only, later_page, everything):
            assert (await communicator.connect(TIMEOUT))[0]

        run = await database_sync_to_async(make_run)(workflow, alice, status=Run.QUEUED)
        await append(run.pk, "run.created", {})
        assert f"run-row-{run.pk}" in await everything.receive_from(TIMEOUT)
        assert await failed_only.receive_nothing(0.3)
        assert await later_page.receive_nothing(0.1)

        # Rows already on a page keep changing, whatever the filters.
        await append(run.pk, "run.status", {"status": "running"})
        for communicator in (failed_only, later_page, everything):
            assert f'<tr id="run-row-{run.pk}"' in await communicator.receive_from(TIMEOUT)
            await communicator.disconnect()

    async_to_sync(scenario)()
