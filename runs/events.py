"""The one module that publishes: it names the groups, appends RunEvents, renders their HTML
fragments and sends them to Channels after the transaction commits, for the groups someone
watches (an open run page, an open runs list: `is_watched`).

Event kinds are namespaced: run.created, run.status, step.created, step.started,
step.finished, step.failed, step.retrying, step.waiting, tool.called, llm.called,
approval.requested, approval.decided, budget.warning. `llm.token` is the one ephemeral kind:
streamed partial output, sent to the run's group without a RunEvent row.
"""

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import queue
import threading
import time

import redis
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections, connection, transaction

from runs import rows
from runs.models import Run, RunEvent

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "runs"
APPROVALS_GROUP = "approvals"


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


# --- who watches ----------------------------------------------------------------------------
# A sorted set per group in Redis: the channel names of the consumers on it, scored by when they
# last said so. Consumers add themselves on connect, refresh every WATCH_REFRESH_S and remove
# themselves on disconnect; an entry older than WATCH_EXPIRY_S is ignored, so a Daphne that died
# without disconnecting its consumers keeps a group watched for a few seconds at most. Redis
# keeps nothing on disk: after a restart the sets are empty until the next refresh, and what
# was skipped meanwhile the run pages catch up from the log at that refresh (runs/consumers.py).
WATCH_REFRESH_S = 5
WATCH_EXPIRY_S = 3 * WATCH_REFRESH_S
# Only "watched" is remembered, briefly: a stale "unwatched" could skip the events a page that
# has just connected replays from the log, a stale "watched" only renders for nobody.
WATCHED_CACHE_S = 1.0

_watched_until: dict[str, float] = {}


def is_watched(run_id: int) -> bool:
    """True when at least one page of this run is open (a RunConsumer on its group)."""
    return run_group(run_id) in watched_groups([run_group(run_id)])


def watched_groups(groups: list[str]) -> set[str]:
    """The groups among `groups` that at least one consumer watches: one Redis round trip for
    those not remembered as watched. When Redis does not answer, every group counts as watched:
    rendering for nobody is better than a page that misses an update."""
    now = time.monotonic()
    watched = {group for group in groups if _watched_until.get(group, 0) > now}
    unknown = [group for group in dict.fromkeys(groups) if group not in watched]
    if not unknown:
        return watched
    try:
        pipe = _redis().pipeline(transaction=False)
        for group in unknown:
            pipe.zcount(_watchers_key(group), time.time() - WATCH_EXPIRY_S, "+inf")
        counts = pipe.execute()
    except redis.RedisError:
        log.warning("could not ask Redis who watches %s", unknown, exc_info=True)
        return set(groups)
    if len(_watched_until) > 10_000:
        _watched_until.clear()
    for group, count in zip(unknown, counts, strict=True):
        if count:
            watched.add(group)
            _watched_until[group] = now + WATCHED_CACHE_S
    return watched


def watch(group: str, channel_name: str) -> None:
    """Count this consumer as watching `group` (on connect, and again every WATCH_REFRESH_S)."""
    key = _watchers_key(group)
    now = time.time()
    pipe = _redis().pipeline(transaction=False)
    pipe.zadd(key, {channel_name: now})
    pipe.zremrangebyscore(key, "-inf", now - WATCH_EXPIRY_S)
    pipe.expire(key, WATCH_EXPIRY_S)
    pipe.execute()


def unwatch(group: str, channel_name: str) -> None:
    _redis().zrem(_watchers_key(group), channel_name)
    _watched_until.pop(group, None)  # this process's own answer changes at once


def _watchers_key(group: str) -> str:
    return f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}:watchers:{group}"


@functools.cache
def _redis() -> redis.Redis:
    """The channel layer's Redis, through a client of this process (thread-safe, with a pool)."""
    host = settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0]
    options = dict(host) if isinstance(host, dict) else {"address": host}
    return redis.Redis.from_url(options.pop("address"), **options)


def append_event(run_id: int, kind: str, payload: dict | None = None) -> None:
    """Append one event with the run's next seq; published once the transaction commits."""
    append_events(run_id, [(kind, payload)])


def append_events(run_id: int, items: list[tuple[str, dict | None]]) -> None:
    """Append events with the run's next seqs and publish them once the transaction commits.

    The seqs come from an UPDATE on the run row, which holds that row's lock until commit, so
    seqs of one run are gap-free and in commit order. Inside `appended_together()` the events
    wait for the end of that block and are written with the others.
    """
    held = getattr(_held, "items", None)
    if held is not None:
        held.extend((run_id, kind, payload) for kind, payload in items)
        return
    _write(run_id, items)


@contextlib.contextmanager
def appended_together():
    """Inside a transaction: write every event appended in this block at its end, with one
    seq update and one insert per run, instead of two statements per append."""
    if getattr(_held, "items", None) is not None:  # nested: the outermost block writes
        yield
        return
    _held.items = []
    try:
        yield
        by_run: dict[int, list] = {}
        for run_id, kind, payload in _held.items:
            by_run.setdefault(run_id, []).append((kind, payload))
        _held.items = None
        for run_id, items in by_run.items():
            _write(run_id, items)
    finally:
        _held.items = None


_held = threading.local()


def _write(run_id: int, items: list[tuple[str, dict | None]]) -> None:
    created = [
        RunEvent(run_id=run_id, seq=0, kind=kind, payload=payload or {}) for kind, payload in items
    ]
    with transaction.atomic(savepoint=False):
        if connection.vendor == "postgresql":
            _insert_taking_seqs(run_id, created)
        else:
            last = _take_seqs(run_id, len(created))
            for i, event in enumerate(created):
                event.seq = last - len(created) + 1 + i
            rows.insert(created)  # written out: bulk_create took twice the statement's CPU
        transaction.on_commit(lambda: [_publisher.put(event) for event in created])


def _take_seqs(run_id: int, count: int) -> int:
    """Move the run's last_seq on by `count` and return the new value, in one statement."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {rows.table(Run)} SET last_seq = last_seq + %s WHERE id = %s "
            "RETURNING last_seq",
            [count, run_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise Run.DoesNotExist(f"run {run_id} does not exist")
    return row[0]


# The fields of an event that the caller fills; run and seq come from the statement itself.
_FILLED = [
    f for f in RunEvent._meta.concrete_fields if not f.primary_key and f.name not in ("run", "seq")
]


def _insert_taking_seqs(run_id: int, created: list[RunEvent]) -> None:
    """PostgreSQL: move the run's last_seq on and insert the events numbered after it, in one
    statement (an UPDATE in a WITH clause), and set each event's seq and key."""
    db = rows.connection_itself()
    q = db.ops.quote_name
    casts = ", ".join(f"CAST(%s AS {field.db_type(db)})" for field in _FILLED)
    params = [len(created), run_id, run_id, len(created)]
    for number, event in enumerate(created, start=1):
        params.append(number)
        params += [field.get_db_prep_save(field.pre_save(event, True), db) for field in _FILLED]
    columns = ", ".join(q(field.column) for field in _FILLED)
    values = ", ".join(f"v.{q(field.column)}" for field in _FILLED)
    with db.cursor() as cursor:
        cursor.execute(
            f"WITH taken AS (UPDATE {rows.table(Run)} SET last_seq = last_seq + %s "
            "WHERE id = %s RETURNING last_seq) "
            f"INSERT INTO {rows.table(RunEvent)} (run_id, seq, {columns}) "
            f"SELECT %s, taken.last_seq - %s + v.number, {values} "
            f"FROM taken, (VALUES {', '.join([f'(%s, {casts})'] * len(created))}) "
            f"AS v(number, {columns}) RETURNING id, seq",
            params,
        )
        keys = {seq: pk for pk, seq in cursor.fetchall()}
    if not keys:
        raise Run.DoesNotExist(f"run {run_id} does not exist")
    first = min(keys)
    for offset, event in enumerate(created):
        event.seq, event.pk = first + offset, keys[first + offset]
        event._state.adding, event._state.db = False, db.alias


class _Publisher:
    """Renders committed events and sends every message to Channels, in the background, so a
    step never waits for templates or Redis. An event that dies with the process is still in the
    log: consumers fill any gap in seqs from the database.

    1. `put(event)` (on commit) queues a stored event for the render thread. It takes every event
       queued so far as one batch and calls `publish_events` on it: each run's events are
       rendered once per batch, in commit order, and only for groups someone watches.
    2. `send(group, message)` (from the render thread, step threads, request threads) hands a
       rendered message to the send thread, which runs one asyncio event loop for the process's
       life and awaits the channel layer's `group_send` there, one message after another, in
       the order they were queued. No thread or loop is made per send: channels_redis keeps its
       connections per loop, and a loop per send (`async_to_sync`) cost milliseconds and
       crashed CPython 3.11 under load. The ORM cannot run on a loop's thread, hence two threads.
    3. `flush()` waits until everything queued before it is rendered and sent.
    """

    IDLE_S = 1.0

    def __init__(self):
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue[RunEvent] = queue.SimpleQueue()
        self._messages: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._renderer: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition()

    def put(self, event: RunEvent) -> None:
        self._count_in()
        self._events.put(event)
        with self._lock:
            if self._renderer is None or not self._renderer.is_alive():
                self._renderer = threading.Thread(
                    target=self._render_forever, name="baton-publisher", daemon=True
                )
                self._renderer.start()

    def send(self, group: str, message: dict) -> None:
        self._count_in()
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(
                    target=self._loop.run_until_complete,
                    args=(self._send_forever(),),
                    name="baton-sender",
                    daemon=True,
                ).start()
            loop = self._loop
        loop.call_soon_threadsafe(self._messages.put_nowait, (group, message))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is sent (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def _count_in(self) -> None:
        with self._idle:
            self._pending += 1

    def _count_out(self, count: int) -> None:
        with self._idle:
            self._pending -= count
            if not self._pending:
                self._idle.notify_all()

    def _render_forever(self) -> None:
        while True:
            try:
                batch = [self._events.get(timeout=self.IDLE_S)]
            except queue.Empty:
                # Hold no database connection while idle (a test database must be droppable).
                connection.close()
                continue
            while True:
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            try:
                publish_events(batch)
            finally:
                self._count_out(len(batch))
            close_old_connections()  # a broken or expired connection is not reused

    async def _send_forever(self) -> None:
        layer = get_channel_layer()
        while True:
            group, message = await self._messages.get()
            try:
                await layer.group_send(group, message)
            except Exception:  # a dead Redis must not fail a step; clients catch up from the log
                log.warning("could not publish to %s", group, exc_info=True)
            finally:
                self._count_out(1)


_publisher = _Publisher()


def flush() -> bool:
    return _publisher.flush()


atexit.register(flush)
# A forked child (a prefork worker) has none of its parent's threads: start afresh.
os.register_at_fork(after_in_child=lambda: globals().update(_publisher=_Publisher()))


def publish_events(stored: list[RunEvent]) -> None:
    """Render stored events (of any runs, in any order) and queue their messages for sending.

    1. Group the events by run, in seq order; ask Redis once which of those runs' groups, and
       whether the dashboard group, anyone watches. Nothing is rendered for the others: their
       events stay in the log, and a page that opens later replays them from there.
    2. Per watched run, one message per stretch of consecutive seqs: the fragments of all of
       them, rendered once (fragments.render_events), marked with the stretch's first and last
       seq. A stretch never spans a seq it lacks: another process publishes that one, and
       the consumer must see the gap to wait for it (runs/consumers.py).
    3. Per run with a dashboard event, when a runs list is open: the run's row, once.

    Never raises: the events are stored, and a client that missed them catches up from the log.
    """
    try:
        messages = _render_messages(stored)
    except Exception:
        log.warning("could not render events of runs %s", {e.run_id for e in stored}, exc_info=True)
        return
    for group, message in messages:
        _publisher.send(group, message)


def _render_messages(stored: list[RunEvent]) -> list[tuple[str, dict]]:
    from runs import fragments

    by_run: dict[int, dict[int, RunEvent]] = {}
    for event in stored:
        by_run.setdefault(event.run_id, {})[event.seq] = event
    on_dashboard = {
        run_id
        for run_id, run_events in by_run.items()
        if any(e.kind in fragments.DASHBOARD_KINDS for e in run_events.values())
    }
    groups = [run_group(run_id) for run_id in by_run]
    watched = watched_groups((groups + [DASHBOARD_GROUP]) if on_dashboard else groups)
    if DASHBOARD_GROUP not in watched:
        on_dashboard = set()
    on_page = {run_id for run_id in by_run if run_group(run_id) in watched}
    # A run's page shows all of the run and its version's graph; the runs list a few columns.
    runs = (
        Run.objects.select_related("version").defer(*fragments.VERSION_SPEC).in_bulk(on_page)
        if on_page
        else {}
    )
    row_runs = fragments.dashboard_runs(on_dashboard)
    messages = []
    for run_id, run_events in by_run.items():
        ordered = [run_events[seq] for seq in sorted(run_events)]
        run = runs.get(run_id)
        if run is not None:
            for stretch in _consecutive(ordered):
                message = {
                    "type": "run.events",
                    "run_id": run_id,
                    "first_seq": stretch[0].seq,
                    "last_seq": stretch[-1].seq,
                    "html": fragments.render_events(stretch, run),
                }
                messages.append((run_group(run_id), message))
        row_run = row_runs.get(run_id)
        if row_run is not None:
            rows = [e for e in ordered if e.kind in fragments.DASHBOARD_KINDS]
            inserted = any(e.kind == "run.created" for e in rows)
            message = {
                "type": "run.row",
                "run_id": run_id,
                "seqs": [e.seq for e in rows],
                "inserted": inserted,
                "html": fragments.render_dashboard_row(row_run, inserted),
            }
            messages.append((DASHBOARD_GROUP, message))
    return messages


def _consecutive(ordered: list[RunEvent]) -> list[list[RunEvent]]:
    stretches = [[ordered[0]]]
    for event in ordered[1:]:
        if event.seq == stretches[-1][-1].seq + 1:
            stretches[-1].append(event)
        else:
            stretches.append([event])
    return stretches


def publish_tokens(run_id: int, step_id: int, text: str) -> None:
    """Streamed partial output of a running LLM call (throttled by the caller, not stored)."""
    from runs import fragments

    message = {
        "type": "run.stream",
        "run_id": run_id,
        "step_id": step_id,
        "html": fragments.render_stream(step_id, text),
    }
    _publisher.send(run_group(run_id), message)


def publish_to_group(group: str, message: dict) -> None:
    """For other apps (the approvals inbox) that publish their own fragments."""
    _publisher.send(group, message)
