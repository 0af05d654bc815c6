"""WebSocket consumers of the run pages: they authorise, join a group and forward fragments.

They read (the user's scope, the stored events to replay) and never write. runs/events.py
publishes every event after its transaction commits, so an event a consumer hears about is
always in the database already; that is what makes the replay and the gap filling below exact.
"""

import json
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import QueryDict

from runs import events, fragments
from runs.forms import RunFilterForm
from runs.models import Run, RunEvent

REPLAY_BATCH = 200


class RunConsumer(AsyncWebsocketConsumer):
    """`ws/runs/<id>/`: every event of one run exactly once, in seq order.

    1. On connect: close unless the user may see the run (the views' query); join the run's
       group, so nothing published from now on is missed.
    2. The page sends {"last_seq": N}, the last event it applied. Until then live messages are
       dropped: they are stored, and the replay sends them.
    3. Replay the stored events with seq > N in order; `sent` is the last seq sent.
    4. A live event with seq <= sent was already sent: skip it. One with seq > sent + 1 reveals
       a gap (publishes of concurrent workers can arrive out of order): send the stored events
       in between first, then it. Streamed tokens have no seq and are forwarded as they come.
    """

    sent: int | None = None

    async def connect(self) -> None:
        self.run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        if not await self._may_see(self.run_id):
            await self.close()
            return
        self.group = events.run_group(self.run_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.sent is not None:
            return  # one hello per connection; the page reconnects to start over
        try:
            last_seq = int(json.loads(text_data or "{}").get("last_seq", 0))
        except (ValueError, TypeError, AttributeError, RecursionError):
            last_seq = 0
        self.sent = max(0, last_seq)
        await self._send_stored(after=self.sent, up_to=None)

    async def run_event(self, message: dict) -> None:
        if self.sent is None or message["seq"] <= self.sent:
            return
        if message["seq"] == self.sent + 1:
            await self.send(text_data=message["html"])
            self.sent = message["seq"]
        else:
            await self._send_stored(after=self.sent, up_to=message["seq"])

    async def run_stream(self, message: dict) -> None:
        if self.sent is not None:
            await self.send(text_data=message["html"])

    async def _send_stored(self, after: int, up_to: int | None) -> None:
        while True:
            batch = await self._render_stored(after, up_to)
            for seq, html in batch:
                await self.send(text_data=html)
                self.sent = after = seq
            if len(batch) < REPLAY_BATCH:
                return

    @database_sync_to_async
    def _render_stored(self, after: int, up_to: int | None) -> list[tuple[int, str]]:
        stored = RunEvent.objects.filter(run_id=self.run_id, seq__gt=after).order_by("seq")
        if up_to is not None:
            stored = stored.filter(seq__lte=up_to)
        return [(event.seq, fragments.render_event(event)) for event in stored[:REPLAY_BATCH]]

    @database_sync_to_async
    def _may_see(self, run_id: int) -> bool:
        return Run.objects.for_user(self.scope["user"]).filter(pk=run_id).exists()


class RunListConsumer(AsyncWebsocketConsumer):
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
        await self.channel_layer.group_add(events.DASHBOARD_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(events.DASHBOARD_GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The list expects nothing from the page."""

    async def run_event(self, message: dict) -> None:
        run_id = message["run_id"]
        if message["kind"] == "run.created":
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
