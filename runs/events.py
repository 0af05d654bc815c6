"""The one module that publishes: it names the groups, appends RunEvents, renders their HTML
fragments and sends them to Channels after the transaction commits.

Event kinds are namespaced: run.created, run.status, step.created, step.started,
step.finished, step.failed, step.retrying, step.waiting, tool.called, llm.called,
approval.requested, approval.decided, budget.warning. `llm.token` is the one ephemeral kind:
streamed partial output, sent to the run's group without a RunEvent row.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import F

from runs.models import Run, RunEvent

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "runs"
APPROVALS_GROUP = "approvals"


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


def append_event(run_id: int, kind: str, payload: dict | None = None) -> RunEvent:
    """Append an event with the run's next seq and publish it once the transaction commits.

    The seq comes from an UPDATE on the run row, which holds that row's lock until commit, so
    seqs of one run are gap-free and in commit order.
    """
    with transaction.atomic():
        Run.objects.filter(pk=run_id).update(last_seq=F("last_seq") + 1)
        seq = Run.objects.values_list("last_seq", flat=True).get(pk=run_id)
        event = RunEvent.objects.create(run_id=run_id, seq=seq, kind=kind, payload=payload or {})
        transaction.on_commit(lambda: publish_event(event))
    return event


def publish_event(event: RunEvent) -> None:
    """Send one stored event to the run's group and the dashboard group. Never raises: the
    event is stored, and a client that missed it catches up from the log."""
    try:
        _publish_event(event)
    except Exception:
        log.warning("could not publish event %s of run %s", event.seq, event.run_id,
                    exc_info=True)


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
        {"type": "run.stream", "run_id": run_id, "step_id": step_id,
         "html": fragments.render_stream(step_id, text)},
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
