"""What the publisher renders and sends: only for groups someone watches (a page open on the
run, a runs list open), several events of a run as one message, and each event still exactly
once and in order on the page's socket. Real consumers through the ASGI stack, the real Redis
channel layer and the real publisher threads."""

import asyncio
import json
import threading

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from runs import engine, events, fragments
from runs.consumers import RunConsumer
from runs.models import Run, Step
from tests.factories import make_agent, make_workflow
from tests.runs.test_consumers import (
    TIMEOUT,
    append,
    event_lines,
    received_events,
    seq_of,
    socket,
    store_silently,
)
from tests.runs.test_views import FANOUT, make_run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def workflow(alice, bob):
    make_agent("analyst")
    return make_workflow(FANOUT, owner=alice, members=[bob], slug="fanout", name="Fan-out team")


@pytest.fixture
def nobody_watches():
    """Watcher entries other tests' servers left behind (a killed Daphne never disconnects
    its sockets) would make the runs list look open."""
    client = events._redis()
    for key in client.scan_iter(events._watchers_key("*")):
        client.delete(key)
    events._watched_until.clear()


def group_watched(group: str) -> bool:
    return group in events.watched_groups([group])


class GroupTap:
    """A bare channel-layer member of a group: it hears what is sent there but, unlike a
    consumer, does not count as watching it."""

    def __init__(self, group: str):
        self.group = group

    async def __aenter__(self):
        self.layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.layer.flush()

    async def next_message(self) -> dict:
        return await asyncio.wait_for(self.layer.receive(self.channel), TIMEOUT)

    async def next_after(self, publish) -> dict:
        """Run `publish` (sync), then send a marker down the same ordered path: the first
        message heard is whatever `publish` sent, or the marker when it sent nothing. (Only
        while no consumer is in the group: consumers have no handler for the marker.)"""

        def publish_then_mark():
            publish()
            events.flush()
            events.publish_to_group(self.group, {"type": "test.marker"})
            events.flush()

        await database_sync_to_async(publish_then_mark)()
        return await self.next_message()


# --- who watches -------------------------------------------------------------------------


def test_a_run_is_watched_exactly_while_a_page_on_it_is_connected(workflow, alice, charlie):
    run = make_run(workflow, alice)
    assert not events.is_watched(run.pk)

    async def scenario():
        outsider = socket(f"/ws/runs/{run.pk}/", charlie)
        assert not (await outsider.connect(TIMEOUT))[0]
        assert not events.is_watched(run.pk)

        first, second = socket(f"/ws/runs/{run.pk}/", alice), socket(f"/ws/runs/{run.pk}/", alice)
        assert (await first.connect(TIMEOUT))[0]
        assert events.is_watched(run.pk)
        assert (await second.connect(TIMEOUT))[0]
        await first.disconnect()
        assert events.is_watched(run.pk)  # the other tab is still open
        await second.disconnect()
        assert not events.is_watched(run.pk)

    async_to_sync(scenario)()


def test_the_runs_list_counts_as_watching_the_dashboard(alice, nobody_watches):
    async def scenario():
        assert not group_watched(events.DASHBOARD_GROUP)
        communicator = socket("/ws/runs/", alice)
        assert (await communicator.connect(TIMEOUT))[0]
        assert group_watched(events.DASHBOARD_GROUP)
        await communicator.disconnect()
        assert not group_watched(events.DASHBOARD_GROUP)

    async_to_sync(scenario)()


def test_a_watcher_nobody_renewed_for_too_long_no_longer_counts(workflow, alice):
    """A Daphne that died without closing its sockets must not keep a run watched."""
    run = make_run(workflow, alice)
    key = events._watchers_key(events.run_group(run.pk))
    events._redis().zadd(key, {"ghost": 0})
    assert not events.is_watched(run.pk)
    events.watch(events.run_group(run.pk), "alive")
    assert events.is_watched(run.pk)
    assert events._redis().zscore(key, "ghost") is None  # swept on the way


# --- nothing rendered for nobody ---------------------------------------------------------


def test_events_of_an_unwatched_run_are_neither_rendered_nor_sent(workflow, alice, nobody_watches):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent")

    async def scenario():
        async with GroupTap(events.run_group(run.pk)) as tap:
            # Through the publisher thread, as the engine publishes on commit.
            heard = await tap.next_after(
                lambda: events.append_event(run.pk, "step.started", {"step_id": step.pk})
            )
            assert heard["type"] == "test.marker"

            page = socket(f"/ws/runs/{run.pk}/", alice)
            assert (await page.connect(TIMEOUT))[0]
            await append(run.pk, "step.finished", {"step_id": step.pk})
            heard = await tap.next_message()
            assert heard["type"] == "run.events" and heard["first_seq"] == heard["last_seq"] == 2
            await page.disconnect()

    async_to_sync(scenario)()

    # Rendering reads the database; for a run nobody watches, publishing reads nothing.
    stored = list(run.events.order_by("seq"))
    with CaptureQueriesContext(connection) as unwatched:
        events.publish_events(stored)
    events.watch(events.run_group(run.pk), "a-page")
    with CaptureQueriesContext(connection) as watched:
        events.publish_events(stored)
    events.unwatch(events.run_group(run.pk), "a-page")
    events.flush()
    assert len(unwatched) == 0 and len(watched) > 0


def test_dashboard_rows_are_rendered_only_while_a_runs_list_is_open(
    workflow, alice, nobody_watches
):
    async def scenario():
        async with GroupTap(events.DASHBOARD_GROUP) as tap:
            first = await database_sync_to_async(make_run)(workflow, alice)
            heard = await tap.next_after(lambda: events.append_event(first.pk, "run.created"))
            assert heard["type"] == "test.marker"

            runs_list = socket("/ws/runs/", alice)
            assert (await runs_list.connect(TIMEOUT))[0]
            second = await database_sync_to_async(make_run)(workflow, alice)
            await append(second.pk, "run.created", {})
            heard = await tap.next_message()
            assert heard["type"] == "run.row" and heard["inserted"]
            assert f'id="run-row-{second.pk}"' in await runs_list.receive_from(TIMEOUT)
            await runs_list.disconnect()

    async_to_sync(scenario)()


def test_a_page_opened_later_replays_what_nobody_watched(workflow, alice, nobody_watches):
    run = make_run(workflow, alice)
    for kind in ("run.created", "run.status", "run.totals"):
        events.append_event(run.pk, kind, {})
    events.flush()

    async def scenario():
        page = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await page.connect(TIMEOUT))[0]
        await page.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(page, through=3) == [1, 2, 3]
        await append_in_one_transaction(run.pk, ["step.created", "run.totals"])
        assert await received_events(page, through=5) == [4, 5]
        assert await page.receive_nothing(0.3)
        await page.disconnect()

    async_to_sync(scenario)()


# --- several events, one message ---------------------------------------------------------


@database_sync_to_async
def append_in_one_transaction(run_id: int, kinds: list[str]) -> None:
    with transaction.atomic():
        for kind in kinds:
            events.append_event(run_id, kind, {})


def test_a_batch_renders_each_step_and_the_header_once_with_every_event_line(workflow, alice):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent")
    events.append_event(run.pk, "run.created", {})

    async def scenario():
        page = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await page.connect(TIMEOUT))[0]
        await page.send_to(text_data=json.dumps({"last_seq": 1}))
        assert await page.receive_nothing(0.2)
        batch = [
            await store_silently(run.pk, kind, {"step_id": step.pk, "node_id": "a"})
            for kind in ("step.created", "step.started", "llm.called", "run.totals")
        ]
        batch.append(await store_silently(run.pk, "step.finished", {"step_id": step.pk}))
        await database_sync_to_async(events.publish_events)(batch)
        html = await page.receive_from(TIMEOUT)
        assert event_lines(html) == [2, 3, 4, 5, 6] and seq_of(html) == 6
        assert html.count('id="run-seq"') == 1
        assert html.count('id="run-header"') == 1
        assert html.count(f'<article id="step-{step.pk}"') == 1
        assert html.count('id="gnode-a"') == 1
        assert await page.receive_nothing(0.3)
        await page.disconnect()

    async_to_sync(scenario)()


def test_batches_with_holes_and_repeats_still_deliver_each_event_once_in_order(workflow, alice):
    """A worker's batch may lack a seq another worker committed in between: its message then
    stops at the hole, and the page gets the missing event from the log, never twice."""
    run = make_run(workflow, alice)
    other = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})

    async def scenario():
        page = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await page.connect(TIMEOUT))[0]
        await page.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(page, through=1) == [1]

        stored = {seq: await store_silently(run.pk, "run.totals") for seq in range(2, 8)}
        elsewhere = await store_silently(other.pk, "run.totals")
        publish = database_sync_to_async(events.publish_events)
        await publish([stored[2], stored[4], stored[5], elsewhere])  # 3 is another worker's
        assert await received_events(page, through=5) == [2, 3, 4, 5]
        await publish([stored[3]])  # the other worker's publish arrives late: nothing new
        await publish([stored[7], stored[6], stored[5]])  # out of order, one repeated
        assert await received_events(page, through=7) == [6, 7]
        assert await page.receive_nothing(0.5)
        await page.disconnect()

    async_to_sync(scenario)()


def test_sends_from_many_threads_share_one_event_loop_and_keep_each_threads_order(workflow, alice):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent", status=Step.RUNNING)

    async def scenario():
        page = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await page.connect(TIMEOUT))[0]
        await page.send_to(text_data=json.dumps({"last_seq": 0}))

        def stream(prefix: str) -> None:
            for n in range(20):
                events.publish_tokens(run.pk, step.pk, f"{prefix}{n}")

        def stream_from_threads() -> None:
            threads = [threading.Thread(target=stream, args=(p,)) for p in "abcd"]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert events.flush()

        await database_sync_to_async(stream_from_threads)()
        texts = [await page.receive_from(TIMEOUT) for _ in range(80)]
        for prefix in "abcd":
            mine = [t for t in texts if f">{prefix}" in t]
            assert mine == [
                f'<pre id="stream-{step.pk}" class="stream" hx-swap-oob="true">{prefix}{n}</pre>'
                for n in range(20)
            ]
        await page.disconnect()

    async_to_sync(scenario)()
    senders = [t for t in threading.enumerate() if t.name == "baton-sender"]
    assert len(senders) == 1


def test_events_committed_from_several_threads_reach_each_page_once_in_order(workflow, alice):
    runs = [make_run(workflow, alice) for _ in range(3)]

    def append_many(run: Run) -> None:
        for _ in range(10):
            events.append_event(run.pk, "run.totals", {})
        connection.close()

    async def scenario():
        pages = [socket(f"/ws/runs/{run.pk}/", alice) for run in runs]
        for page in pages:
            assert (await page.connect(TIMEOUT))[0]
            await page.send_to(text_data=json.dumps({"last_seq": 0}))

        def append_all() -> None:
            threads = [threading.Thread(target=append_many, args=(run,)) for run in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert events.flush()

        await database_sync_to_async(append_all)()
        for page in pages:
            assert await received_events(page, through=10) == list(range(1, 11))
            await page.disconnect()

    async_to_sync(scenario)()


def test_a_message_that_overtook_another_waits_for_it_instead_of_reading_the_log(
    workflow, alice, monkeypatch
):
    """Publishes of two processes may arrive in the wrong order: the later one is held until
    the earlier one arrives, and both are forwarded as published (no re-rendering of the gap:
    with many viewers every consumer would render it at once)."""
    monkeypatch.setattr(RunConsumer, "HOLD_S", 60)  # the earlier one surely arrives first
    run = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})

    async def scenario():
        page = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await page.connect(TIMEOUT))[0]
        await page.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(page, through=1) == [1]
        second = await store_silently(run.pk, "run.status")
        third = await store_silently(run.pk, "run.totals")
        publish = database_sync_to_async(events.publish_events)
        await publish([third])
        assert await page.receive_nothing(0.3)
        await publish([second])
        assert event_lines(await page.receive_from(TIMEOUT)) == [2]
        assert event_lines(await page.receive_from(TIMEOUT)) == [3]
        assert await page.receive_nothing(0.3)
        await page.disconnect()

    async_to_sync(scenario)()


def test_a_batch_costs_the_queries_of_one_event(workflow, alice):
    """Rendering reads the run, the steps the events name (with their tool calls) and the
    graph's nodes once per batch, however many events and steps the batch holds."""
    run = make_run(workflow, alice)
    Run.objects.filter(pk=run.pk).update(status=Run.RUNNING)
    run.refresh_from_db()
    first = Step.objects.create(run=run, node_id="a", kind="agent", status=Step.SUCCEEDED)
    second = Step.objects.create(run=run, node_id="b", kind="agent", status=Step.RUNNING)
    for step in (first, second):
        for kind in ("step.created", "step.started", "llm.called", "run.totals"):
            events.append_event(run.pk, kind, {"step_id": step.pk, "node_id": step.node_id})
    events.append_event(run.pk, "step.finished", {"step_id": first.pk, "node_id": "a"})
    stored = list(run.events.order_by("seq"))
    engine.spec_of(run.version)  # the graph's spec: read once per process

    with CaptureQueriesContext(connection) as one:
        fragments.render_events(stored[:1])
    with CaptureQueriesContext(connection) as all_of_them:
        html = fragments.render_events(stored)
    assert event_lines(html) == [e.seq for e in stored]
    assert len(all_of_them) == len(one) == 4


def test_a_page_finds_at_its_next_refresh_the_events_no_message_announced(
    workflow, alice, monkeypatch
):
    """Pub/sub delivers at most once, and after a Redis restart nobody counts as watching until
    the pages refresh: a run's last events can be stored and never published, with no later
    message to reveal the gap. Each refresh compares the stored seq with what was sent."""
    monkeypatch.setattr(events, "WATCH_REFRESH_S", 0.2)
    run = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})
    events.flush()

    async def scenario():
        page = socket(f"/ws/runs/{run.pk}/", alice)
        assert (await page.connect(TIMEOUT))[0]
        await page.send_to(text_data=json.dumps({"last_seq": 0}))
        assert await received_events(page, through=1) == [1]
        await store_silently(run.pk, "run.status", {"status": "succeeded"})
        assert await received_events(page, through=2) == [2]
        assert await page.receive_nothing(0.6)
        await page.disconnect()

    async_to_sync(scenario)()
