"""WebSocket consumers of the run pages: they authorise, join a group and forward fragments.

They read (the user's scope, the stored events to replay) and never write to the database. Each
counts itself as watching its group in Redis while it is connected (runs/events.py `watch`), so
the publishers render for the groups someone watches only.

runs/events.py publishes every event after its transaction commits, so an event a consumer
hears about is always in the database already; that is what makes the replay and the gap
filling below exact. A consumer counts as watching before it replays anything: an event the
publishers skipped was committed before they asked, hence before the replay reads the log.
"""

import asyncio
import json
import logging
import time

from asgiref.sync import sync_to_async
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import QueryDict

from runs import events, fragments
from runs.forms import RunFilterForm
from runs.models import Run, RunEvent

log = logging.getLogger(__name__)

REPLAY_BATCH = 200


class _WatchingConsumer(AsyncWebsocketConsumer):
    """Joins one group and counts itself as its watcher while connected.

    The watcher entry is refreshed every events.WATCH_REFRESH_S (a page may stay open on a run
    that waits days for an approval) by a task that ends with the consumer, on disconnect or
    when the consumer crashes; an entry nobody refreshes anymore expires by itself.
    """

    watched: str | None = None

    async def watch(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        await sync_to_async(events.watch, thread_sensitive=False)(group, self.channel_name)
        self.watched = group
        self.refresher = asyncio.create_task(self._refresh(group))
        asyncio.current_task().add_done_callback(lambda _task: self.refresher.cancel())

    async def disconnect(self, code: int) -> None:
        if self.watched is not None:
            self.refresher.cancel()
            await self.channel_layer.group_discard(self.watched, self.channel_name)
            await sync_to_async(events.unwatch, thread_sensitive=False)(
                self.watched, self.channel_name
            )

    async def dispatch(self, message: dict) -> None:
        """Channels' own dispatch first closes stale database connections, a hop to the one
        shared sync thread for every message to every socket (200 sockets: 200 hops per event).
        Handlers here reach the database through database_sync_to_async only, which does that
        itself, so they are called directly."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def _refresh(self, group: str) -> None:
        while True:
            await asyncio.sleep(events.WATCH_REFRESH_S)
            try:
                await sync_to_async(events.watch, thread_sensitive=False)(group, self.channel_name)
                await self.catch_up()
            except Exception:  # Redis or the database away: the next round tries again
                log.warning("refreshing the watch of %s failed", group, exc_info=True)

    async def catch_up(self) -> None:
        """Every refresh: send what the live messages missed (none by default)."""


class RunConsumer(_WatchingConsumer):
    """`ws/runs/<id>/`: every event of one run exactly once, in seq order.

    1. On connect: close unless the user may see the run (the views' query); join the run's
       group and count as watching it, so nothing published from now on is missed.
    2. The page sends {"last_seq": N}, the last event it applied. Until then live messages are
       dropped: they are stored, and the replay sends them.
    3. Replay the stored events with seq > N in order, REPLAY_BATCH per message; `sent` is the
       last seq sent.
    4. A live message covers the consecutive seqs first_seq..last_seq. One with last_seq <=
       sent was already sent: drop it. One with first_seq = sent + 1 is forwarded; one that
       overlaps what was sent has the rest of its seqs sent from the log.
    5. One with first_seq > sent + 1 shows a gap: publishes of concurrent processes can
       arrive out of order, and a pub/sub channel layer may lose one. It is held, and held
       messages are tried again in seq order whenever `sent` moves on. If a gap is still open
       HOLD_S later, the stored events up to the highest held seq are sent from the log.
       Waiting first matters: a late message is the rule and a lost one the exception, and
       every consumer of the run would otherwise read and render the same gap at once.
    Streamed tokens have no seq and are forwarded as they come. A lock keeps the handlers and
    the gap timer from interleaving their sends.
    """

    HOLD_S = 0.5

    sent: int | None = None

    async def connect(self) -> None:
        self.run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        self.held: dict[int, dict] = {}  # by first_seq
        self.lock = asyncio.Lock()
        self.gap_timer: asyncio.Task | None = None
        if not await self._may_see(self.run_id):
            await self.close()
            return
        await self.watch(events.run_group(self.run_id))
        self.watching_since = time.monotonic()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.gap_timer is not None:
            self.gap_timer.cancel()
        await super().disconnect(code)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        async with self.lock:
            if self.sent is not None:
                return  # one hello per connection; the page reconnects to start over
            try:
                last_seq = int(json.loads(text_data or "{}").get("last_seq", 0))
            except (ValueError, TypeError, AttributeError, RecursionError):
                last_seq = 0
            self.sent = max(0, last_seq)
            await self._send_stored(after=self.sent, up_to=None)

    async def run_events(self, message: dict) -> None:
        async with self.lock:
            if self.sent is None or message["last_seq"] <= self.sent:
                return
            self.held[message["first_seq"]] = message
            await self._send_held()

    async def run_stream(self, message: dict) -> None:
        if self.sent is not None:
            await self.send(text_data=message["html"])

    async def catch_up(self) -> None:
        """Pub/sub delivers at most once, and after a Redis restart nobody counts as watching
        until the next refresh, so publishers skip the run: a missed message at the end of a
        run would leave the page stale with no later message to reveal the gap. So every
        refresh compares the run's last stored seq with what was sent and sends the rest."""
        async with self.lock:
            if self.sent is None:
                return
            stored = await database_sync_to_async(self._last_stored_seq)()
            if stored > self.sent:
                await self._send_stored(after=self.sent, up_to=stored)
                await self._send_held()

    def _last_stored_seq(self) -> int:
        return Run.objects.values_list("last_seq", flat=True).get(pk=self.run_id)

    async def _send_held(self) -> None:
        """Send the held messages that continue what was sent, in seq order; keep the rest
        (behind a gap) and have the timer watch them."""
        for first in sorted(self.held):
            message = self.held[first]
            if first > self.sent + 1:
                break
            del self.held[first]
            if message["last_seq"] <= self.sent:
                continue
            if first == self.sent + 1:
                await self.send(text_data=message["html"])
                self.sent = message["last_seq"]
            else:
                await self._send_stored(after=self.sent, up_to=message["last_seq"])
        if self.held and self.gap_timer is None:
            self.gap_timer = asyncio.create_task(self._fill_gap_later())
        elif not self.held and self.gap_timer is not None:
            self.gap_timer.cancel()
            self.gap_timer = None

    async def _fill_gap_later(self) -> None:
        await asyncio.sleep(self.HOLD_S)
        async with self.lock:
            self.gap_timer = None
            if self.held:
                last = max(message["last_seq"] for message in self.held.values())
                await self._send_stored(after=self.sent, up_to=last)
                await self._send_held()

    async def _send_stored(self, after: int, up_to: int | None) -> None:
        while True:
            count, last, html = await self._render_stored(after, up_to)
            if count:
                await self.send(text_data=html)
                self.sent = after = last
            if count < REPLAY_BATCH:
                return

    async def _render_stored(self, after: int, up_to: int | None) -> tuple[int, int, str]:
        """The stored events after `after` (up to `up_to`), rendered by this consumer or, when
        it is the same range, by another consumer of this process that is rendering it now: a
        run's viewers fill a gap or reconnect together. A replay to the end (`up_to` None)
        is only shared when it began after this consumer joined the group, or it could stop
        short of an event published before the join."""
        key = (self.run_id, after, up_to)
        shared = _renders.get(key)
        if shared is None or (up_to is None and shared[0] < self.watching_since):
            shared = (time.monotonic(), asyncio.ensure_future(_render_stored(*key)))
            _renders[key] = shared
            shared[1].add_done_callback(
                lambda _done: _renders.pop(key) if _renders.get(key) is shared else None
            )
        return await asyncio.shield(shared[1])

    @database_sync_to_async
    def _may_see(self, run_id: int) -> bool:
        return Run.objects.for_user(self.scope["user"]).filter(pk=run_id).exists()


# Renders of stored events in progress in this process: (run, after, up_to) -> (began, task).
_renders: dict[tuple[int, int, int | None], tuple[float, asyncio.Future]] = {}


@database_sync_to_async
def _render_stored(run_id: int, after: int, up_to: int | None) -> tuple[int, int, str]:
    """Up to REPLAY_BATCH stored events after `after`, rendered as one message: how many, the
    last seq, the HTML."""
    stored = RunEvent.objects.filter(run_id=run_id, seq__gt=after).order_by("seq")
    if up_to is not None:
        stored = stored.filter(seq__lte=up_to)
    batch = list(stored[:REPLAY_BATCH])
    if not batch:
        return 0, after, ""
    return len(batch), batch[-1].seq, fragments.render_events(batch)


class RunListConsumer(_WatchingConsumer):
    """`ws/runs/`: rows of the runs list. Only runs the user may see are forwarded, and a new
    run is only inserted when it matches the list's filters (sent in the query string).

    Visibility is checked with the views' query once per run and remembered for a short while,
    so a busy run's stream of cost updates costs one query, not one per update.
    """

    VISIBILITY_TTL_S = 30.0
    MAX_REMEMBERED = 2000

    async def connect(self) -> None:
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close()
            return
        query = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
        self.inserts = query.get("inserts") != "0"
        self.filters = query
        self.visible: dict[int, tuple[bool, float]] = {}
        await self.watch(events.DASHBOARD_GROUP)
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The list expects nothing from the page."""

    async def run_row(self, message: dict) -> None:
        run_id = message["run_id"]
        if message["inserted"]:
            if self.inserts and await self._matches_filters(run_id):
                await self.send(text_data=message["html"])
            return
        if await self._may_see(run_id):
            await self.send(text_data=message["html"])

    async def _may_see(self, run_id: int) -> bool:
        known = self.visible.get(run_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        visible = await self._query_visible(run_id)
        if len(self.visible) >= self.MAX_REMEMBERED:
            self.visible.clear()
        self.visible[run_id] = (visible, time.monotonic() + self.VISIBILITY_TTL_S)
        return visible

    @database_sync_to_async
    def _query_visible(self, run_id: int) -> bool:
        return Run.objects.for_user(self.scope["user"]).filter(pk=run_id).exists()

    @database_sync_to_async
    def _matches_filters(self, run_id: int) -> bool:
        user = self.scope["user"]
        form = RunFilterForm(self.filters or None, user=user)
        return form.filter(Run.objects.for_user(user)).filter(pk=run_id).exists()
