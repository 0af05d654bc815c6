"""The one module that publishes: it names the groups, appends RunEvents, renders their HTML
fragments and sends them to Channels after the transaction commits.

Event kinds are namespaced: run.created, run.status, step.created, step.started,
step.finished, step.failed, step.retrying, step.waiting, tool.called, llm.called,
approval.requested, approval.decided, budget.warning. `llm.token` is the one ephemeral kind:
streamed partial output, sent to the run's group without a RunEvent row.
"""

import atexit
import logging
import queue
import threading

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection, transaction
from django.db.models import F

from runs.models import Run, RunEvent

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "runs"
APPROVALS_GROUP = "approvals"


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


def append_event(run_id: int, kind: str, payload: dict | None = None) -> RunEvent:
    """Append one event with the run's next seq; published once the transaction commits."""
    return append_events(run_id, [(kind, payload)])[0]


def append_events(run_id: int, items: list[tuple[str, dict | None]]) -> list[RunEvent]:
    """Append events with the run's next seqs and publish them once the transaction commits.

    The seqs come from an UPDATE on the run row, which holds that row's lock until commit, so
    seqs of one run are gap-free and in commit order.
    """
    with transaction.atomic():
        Run.objects.filter(pk=run_id).update(last_seq=F("last_seq") + len(items))
        last = Run.objects.values_list("last_seq", flat=True).get(pk=run_id)
        created = RunEvent.objects.bulk_create(
            [
                RunEvent(
                    run_id=run_id, seq=last - len(items) + 1 + i, kind=kind, payload=payload or {}
                )
                for i, (kind, payload) in enumerate(items)
            ]
        )
        transaction.on_commit(lambda: [_publisher.put(event) for event in created])
    return created


class _Publisher:
    """Renders and sends committed events from one background thread per process, in commit
    order, so a step never waits for templates or Redis. An event that dies with the process
    is still in the log: consumers fill any gap in seqs from the database."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def put(self, event: RunEvent) -> None:
        self._idle.clear()
        self._queue.put(event)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="baton-publisher", daemon=True
                )
                self._thread.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is sent (tests, shutdown)."""
        return self._idle.wait(timeout_s)

    def _run(self) -> None:
        idle_s = 0
        try:
            while idle_s < 30:
                try:
                    event = self._queue.get(timeout=1)
                except queue.Empty:
                    # Hold no database connection while idle (a test database must be droppable).
                    connection.close()
                    idle_s += 1
                    continue
                idle_s = 0
                publish_event(event)
                if self._queue.empty():
                    self._idle.set()
        finally:
            self._idle.set()
            connection.close()


_publisher = _Publisher()
atexit.register(_publisher.flush)


def flush() -> bool:
    return _publisher.flush()


def publish_event(event: RunEvent) -> None:
    """Send one stored event to the run's group and the dashboard group. Never raises: the
    event is stored, and a client that missed it catches up from the log."""
    try:
        _publish_event(event)
    except Exception:
        log.warning("could not publish event %s of run %s", event.seq, event.run_id, exc_info=True)


def _publish_event(event: RunEvent) -> None:
    from runs import fragments

    message = {
        "type": "run.event",
        "run_id": event.run_id,
        "seq": event.seq,
        "kind": event.kind,
        "html": fragments.render_event(event),
    }
    _send(run_group(event.run_id), message)
    if event.kind in fragments.DASHBOARD_KINDS:
        _send(DASHBOARD_GROUP, {**message, "html": fragments.render_dashboard_row(event)})


def publish_tokens(run_id: int, step_id: int, text: str) -> None:
    """Streamed partial output of a running LLM call (throttled by the caller, not stored)."""
    from runs import fragments

    _send(
        run_group(run_id),
        {
            "type": "run.stream",
            "run_id": run_id,
            "step_id": step_id,
            "html": fragments.render_stream(step_id, text),
        },
    )


def publish_to_group(group: str, message: dict) -> None:
    """For other apps (the approvals inbox) that publish their own fragments."""
    _send(group, message)


def _send(group: str, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:  # a dead Redis must not fail a step; clients catch up from the log
        log.warning("could not publish to %s", group, exc_info=True)
