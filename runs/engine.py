"""The engine: starts runs, executes steps, advances the graph, and applies controls and human
decisions. The database is the truth; a Celery message is only a doorbell.

A step's life:
1. `_create_step` inserts it (pending) and rings the doorbell after commit, unless the Celery task
   that made it ready will execute it next itself (`execute_steps`).
2. `execute_step` claims it with a compare-and-swap (pending, or running with an expired lease),
   keeps its lease alive (one lease thread per process) and runs the node function (runs/nodes.py)
   with no transaction open. LLM and tool calls are recorded as they happen (runs/context.py).
3. The outcome is saved with a compare-and-swap on (status=running, attempt=ours), so a worker
   that lost its lease can never overwrite a newer attempt.
4. `_advance` then runs under the run's row lock: it follows the node's edges, creates the next
   steps, counts join arrivals, and finishes the run when nothing is left to do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import timedelta
from decimal import Decimal

import jsonschema
import referencing.exceptions
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)
from django.db.models import F, Q
from django.utils import timezone

from runs import events, nodes, rows
from runs.context import (
    ApprovalRejected,
    BudgetExceeded,
    Cancelled,
    LeaseLost,
    StepContext,
    StepFailed,
    StoredCall,
    WaitingForHuman,
    storable,
)
from runs.llm import LLMError
from runs.models import LookupToken, Run, Step, Switch, ToolCall
from teams.models import Workflow, WorkflowVersion
from teams.spec import entry_node, node_map

log = logging.getLogger(__name__)

STOP_EVERYTHING = "stop_everything"
# A step claimed this many times (its worker died, its database connection dropped) fails.
MAX_CLAIMS = 10
# A Celery task executes at most this many steps of a run one after another before it hands the
# next one to the queue, so one long run never holds a worker thread for ever.
STEPS_PER_TASK = 50


class RunInputError(ValidationError):
    """The run's input does not fit the workflow's input schema (or is too large)."""


class RunControlError(Exception):
    """A control (cancel, pause, ...) that does not apply to the run in its current state."""


# --- starting -------------------------------------------------------------------------------


def validate_input(spec: dict, data) -> dict:
    if not isinstance(data, dict):
        raise RunInputError("The input must be a JSON object.")
    try:
        size = len(json.dumps(data, allow_nan=False))
    except (ValueError, RecursionError) as exc:
        raise RunInputError(f"The input is not plain JSON: {exc}"[:300]) from exc
    if size > settings.BATON_MAX_INPUT_BYTES:
        raise RunInputError(
            f"The input is {size} bytes; the limit is {settings.BATON_MAX_INPUT_BYTES} bytes."
        )
    schema = spec.get("input_schema") or {"type": "object"}
    try:
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(data),
            key=lambda e: [str(p) for p in e.path],
        )
    except (jsonschema.SchemaError, referencing.exceptions.Unresolvable, RecursionError) as exc:
        raise RunInputError(f"The workflow's input schema cannot be used: {exc}"[:500]) from exc
    if errors:
        raise RunInputError(
            [
                (f"{'.'.join(str(p) for p in e.path)}: {e.message}" if e.path else e.message)
                for e in errors
            ]
        )
    return data


def start_run(
    version: WorkflowVersion,
    input: dict,
    user,
    *,
    budget: dict | None = None,
    overrides: dict | None = None,
    parent_step: Step | None = None,
) -> Run:
    """Create a run of a published version and its first step in one transaction."""
    spec = spec_of(version)
    data = validate_input(spec, input)
    workflow = version.workflow
    with _writing():
        run = Run.objects.create(
            workflow=workflow,
            version=version,
            input=data,
            state=dict(data),
            started_by=user if user is not None and user.is_authenticated else None,
            budget={**workflow.run_budget(), **(budget or {})},
            overrides=overrides or {},
            parent=parent_step.run if parent_step else None,
            parent_step=parent_step,
            status=Run.PAUSED if stop_everything_on() else Run.QUEUED,
        )
        events.append_event(
            run.pk,
            "run.created",
            {"status": run.status, "workflow": workflow.slug, "version": version.number},
        )
        _create_step(run, spec, entry_node(spec), branches=[])
    return run


def _create_step(run: Run, spec: dict, node_id: str, branches: list) -> Step | None:
    """Insert the next iteration of a node (pending) and ring the doorbell after commit."""
    created = _create_steps(run, spec, [(node_id, branches)])
    return created[0] if created else None


def _create_steps(run: Run, spec: dict, targets: list[tuple[str, list]]) -> list[Step]:
    """Insert the next iteration of each (node, branches) target, pending, and ring their
    doorbells after commit. A fan-out's branches are written together: one insert (which
    numbers the iterations), one step count update and one event write, whatever their number.
    Past the run's max_steps budget nothing is created and the run ends."""
    max_steps = (run.budget or {}).get("max_steps")
    if max_steps and run.step_count + len(targets) > max_steps:
        _finish_run(run, Run.BUDGET_EXCEEDED, f"max steps per run ({max_steps}) reached")
        return []
    nodes = node_map(spec)
    steps = [
        Step(run=run, node_id=node_id, kind=nodes[node_id]["kind"], branches=branches)
        for node_id, branches in targets
    ]
    _insert_steps(steps)
    run.step_count += len(steps)
    events.append_events(run.pk, [("step.created", _step_payload(step)) for step in steps])
    if run.status != Run.PAUSED:
        for step in steps:
            _enqueue(step.pk)
    return steps


_STEP_FIELDS = [f for f in Step._meta.concrete_fields if not f.primary_key]


def _insert_steps(steps: list[Step]) -> None:
    """Insert new steps of one run in one statement, each the next iteration of its node: the
    database counts the iterations (the caller holds the run's lock, so no one else adds any),
    and hands back the ids; and add them to the run's step count, on PostgreSQL in the same
    statement. Written out because the ORM needed a query for the iterations and twice the
    CPU of the INSERT to build it; each value is still prepared by its model field."""
    db = rows.connection_itself()
    q = db.ops.quote_name
    run_id = steps[0].run_id
    columns = ", ".join(q(field.column) for field in _STEP_FIELDS)
    iteration = (
        f"(SELECT COALESCE(MAX(iteration), -1) + 1 + %s FROM {rows.table(Step)} "
        "WHERE run_id = %s AND node_id = %s)"
    )
    values, params, seen = [], [], Counter()
    for step in steps:
        row = []
        for field in _STEP_FIELDS:
            if field.name == "iteration":
                row.append(iteration)
                params += [seen[step.node_id], step.run_id, step.node_id]
            else:
                row.append("%s")
                params.append(field.get_db_prep_save(field.pre_save(step, True), db))
        seen[step.node_id] += 1
        values.append(f"({', '.join(row)})")
    counted = ""
    if db.vendor == "postgresql":
        counted = (
            f"WITH counted AS (UPDATE {rows.table(Run)} SET step_count = step_count + %s "
            "WHERE id = %s) "
        )
        params = [len(steps), run_id, *params]
    else:
        rows.update(Run, "id = %s", [run_id], add={"step_count": len(steps)})
    with db.cursor() as cursor:
        cursor.execute(
            f"{counted}INSERT INTO {rows.table(Step)} ({columns}) VALUES {', '.join(values)} "
            "RETURNING id, node_id, iteration",
            params,
        )
        by_node = defaultdict(list)
        for pk, node_id, number in sorted(cursor.fetchall(), key=lambda row: row[2]):
            by_node[node_id].append((pk, number))
    for step in steps:  # a node's steps were numbered in list order
        step.pk, step.iteration = by_node[step.node_id].pop(0)
        step._state.adding, step._state.db = False, db.alias


def _enqueue(step_id: int, countdown: float | None = None) -> None:
    """Ring the doorbell for a step once the transaction commits. Inside `execute_steps`, the
    first step made ready without a delay is kept for this thread to execute next instead."""
    if countdown is None and getattr(_next_here, "wanted", False):
        transaction.on_commit(lambda: _keep_or_ring(step_id))
    else:
        transaction.on_commit(lambda: _enqueue_now(step_id, countdown))


def _keep_or_ring(step_id: int) -> None:
    if getattr(_next_here, "wanted", False) and _next_here.step_id is None:
        _next_here.step_id = step_id
    else:
        _enqueue_now(step_id)


def _step_payload(step: Step, **extra) -> dict:
    return {
        "step_id": step.pk,
        "node_id": step.node_id,
        "kind": step.kind,
        "iteration": step.iteration,
        "status": step.status,
        **extra,
    }


# --- executing ------------------------------------------------------------------------------

# The step `execute_steps` will execute next in this thread (see `_enqueue`).
_next_here = threading.local()


def execute_steps(step_id: int) -> None:
    """Execute a step, then the step it made ready, and so on, in this thread (the Celery task's
    entry). A sequential run then pays no queue hop between steps; every step is still claimed,
    leased and saved on its own, so a worker that dies here loses nothing: the sweeper rings
    for the pending step it left. Further steps made ready at once (a fan-out's other
    branches) ring the doorbell as usual, and so does the step after STEPS_PER_TASK."""
    for _ in range(STEPS_PER_TASK):
        _next_here.wanted, _next_here.step_id = True, None
        try:
            execute_step(step_id)
        finally:
            _next_here.wanted = False
        step_id = _next_here.step_id
        if step_id is None:
            return
    _enqueue_now(step_id)


def execute_step(step_id: int) -> None:
    """Claim one step, run its node, save the outcome, advance the run. Safe to call twice."""
    step = _claim(step_id)
    if step is None:
        return
    run = step.run
    spec = spec_of(run.version)
    node = node_map(spec)[step.node_id]
    ctx = StepContext(step, run, node, spec)
    _leases.hold(step)
    try:
        try:
            text, output = nodes.EXECUTORS[node["kind"]](ctx)
        except BaseException:
            ctx.record_pending_call()  # a paid call is on record before the step moves on
            raise
        finally:
            _leases.release(step)
    except WaitingForHuman as waiting:
        _save_waiting(ctx, str(waiting))
    except Cancelled:
        _save_outcome(ctx, Step.CANCELLED, error="run cancelled")
    except LeaseLost as lost:
        _drop_attempt(ctx, lost)
    except (OperationalError, InterfaceError) as exc:
        _after_database_error(ctx, exc)
    except ApprovalRejected as rejected:
        _after_rejection(ctx, rejected.reason)
    except BudgetExceeded as breach:
        _after_budget_breach(ctx, breach)
    except StepFailed as failure:
        _after_failure(ctx, failure.kind, failure.message)
    except LLMError as error:
        if error.transient:
            _retry_or_fail(ctx, error.message)
        else:
            _after_failure(ctx, "permanent", error.message)
    except Exception as exc:  # a bug or a provider surprise: fail visibly, keep the worker
        log.exception("step %s crashed", step_id)
        _after_failure(ctx, "permanent", f"{type(exc).__name__}: {exc}")
    else:
        try:
            _after_success(ctx, text, output)
        except (OperationalError, InterfaceError) as exc:
            _after_database_error(ctx, exc)


def spec_of(version: WorkflowVersion) -> dict:
    """A published version's spec (upgraded to the current schema), read and parsed once per
    process: versions are immutable. Keyed by id and creation time, so a test database that
    reuses ids never gets another version's spec. Callers must not modify it."""
    return _cached_spec(version.pk, version.created_at)


@functools.lru_cache(maxsize=512)
def _cached_spec(version_id: int, created_at) -> dict:
    return WorkflowVersion.objects.get(pk=version_id).get_spec()


def _drop_attempt(ctx: StepContext, lost: LeaseLost) -> None:
    """Another attempt owns the step now. Give back what our own copy of its last call holds
    of the run's budget: here, after the transaction that found out was rolled back."""
    log.info("step %s: lease lost, dropping this attempt (%s)", ctx.step.pk, lost)
    ctx.release(*lost.reserved)


def _after_database_error(ctx: StepContext, exc: Exception) -> None:
    """The database failed under the step (a dropped connection, a failover, a cancelled
    statement). Each write of a step is atomic, so nothing is half-written: run the step again
    after a short pause. This does not use up the agent's LLM retries; a step claimed
    MAX_CLAIMS times fails, as one whose worker keeps dying does. If the database is still
    away, this write fails too: then the step's lease runs out and the sweeper rings again."""
    log.warning("step %s: database error, retrying: %s", ctx.step.pk, exc)
    connection.close()  # never reuse a broken connection; the next query opens a new one
    step = ctx.step
    message = f"database error: {exc}"[:2000]
    try:
        ctx.record_pending_call()  # a call already paid for is replayed, not made again
        if step.attempt >= MAX_CLAIMS:
            _after_failure(ctx, "transient", f"gave up after {step.attempt} attempts: {message}")
            return
        delay = settings.BATON_RETRY_BACKOFF_S * (0.5 + random.random())
        attempt = {
            "attempt": step.attempt,
            "error_kind": "transient",
            "error": message,
            "at": timezone.now().isoformat(),
        }
        _retry_later(ctx, delay, message, attempts=[*step.attempts, attempt])
    except LeaseLost as lost:
        _drop_attempt(ctx, lost)
    except (OperationalError, InterfaceError):
        log.warning("step %s: database still unavailable; the sweeper will retry it", step.pk)


# The claim's two statements, written out once per process (runs/rows.py): through the ORM
# they cost about 3.5 ms of CPU per step. The workflow's draft and layout and the version's spec
# and layout stay unread: no step uses the first two, and spec_of() caches the spec.
_CLAIMED = rows.Rows(
    [
        (Step, "s", ()),
        (Run, "r", ()),
        (Workflow, "w", ("draft", "layout")),
        (WorkflowVersion, "v", ("spec", "layout")),
    ]
)


@functools.cache
def _claim_statements(vendor: str) -> tuple[str, str, str | None]:
    on = connection.ops.quote_name(Switch._meta.get_field("on").column)
    stopped = f"EXISTS (SELECT 1 FROM {rows.table(Switch)} x WHERE x.name = %s AND x.{on})"
    token = f"(SELECT t.value FROM {rows.table(LookupToken)} t WHERE t.name = %s)"
    joined = (
        f"INNER JOIN {rows.table(Workflow)} w ON w.id = r.workflow_id "
        f"INNER JOIN {rows.table(WorkflowVersion)} v ON v.id = r.version_id"
    )
    select = (
        f"SELECT {_CLAIMED.columns()}, {stopped}, {token} FROM {rows.table(Step)} s "
        f"INNER JOIN {rows.table(Run)} r ON r.id = s.run_id {joined} WHERE s.id = %s"
    )
    # Compare-and-swap: pending, or running with an expired lease (its worker died), and still
    # the attempt we read.
    update = (
        f"UPDATE {rows.table(Step)} SET status = %s, attempt = %s, lease_until = %s, "
        f"started_at = %s WHERE id = %s AND attempt = %s "
        f"AND (status = %s OR (status = %s AND lease_until < %s))"
    )
    # PostgreSQL: the common case in one statement. A step that can run now (pending, or
    # running with an expired lease; due; its run going and not paused; nothing stopped) is
    # swapped to running and comes back with its run, workflow and version, as the SELECT
    # reads them. Any other step matches nothing, and the two statements above sort it out.
    at_once = None
    if vendor == "postgresql":
        at_once = (
            f"UPDATE {rows.table(Step)} s SET status = %s, attempt = s.attempt + 1, "
            "lease_until = %s, started_at = COALESCE(s.started_at, %s) "
            f"FROM {rows.table(Run)} r {joined} WHERE s.id = %s AND r.id = s.run_id "
            "AND (s.status = %s OR (s.status = %s AND s.lease_until < %s)) "
            "AND (s.not_before IS NULL OR s.not_before <= %s) AND r.status IN (%s, %s, %s) "
            f"AND NOT {stopped} RETURNING {_CLAIMED.columns()}, FALSE, {token}"
        )
    return select, update, at_once


def _claimed_row(step_id: int) -> Step | None:
    """The step, its run, the run's workflow and version, whether everything is stopped and
    the lookup token (runs/models.py LookupToken)."""
    select, _, _ = _claim_statements(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(select, [STOP_EVERYTHING, LookupToken.LOOKUPS, step_id])
        return _read_claimed(cursor.fetchone())


def _claimed_at_once(step_id: int, now, lease) -> Step | None:
    """PostgreSQL: claim a step that can run now in one statement (see _claim_statements);
    None when it cannot, or on another database."""
    _, _, at_once = _claim_statements(connection.vendor)
    if at_once is None:
        return None
    moment = Step._meta.get_field("lease_until")
    with connection.cursor() as cursor:
        cursor.execute(
            at_once,
            [
                Step.RUNNING,
                moment.get_db_prep_save(lease, connection),
                moment.get_db_prep_save(now, connection),
                step_id,
                Step.PENDING,
                Step.RUNNING,
                moment.get_db_prep_value(now, connection),
                moment.get_db_prep_value(now, connection),
                Run.QUEUED,
                Run.RUNNING,
                Run.WAITING_APPROVAL,
                STOP_EVERYTHING,
                LookupToken.LOOKUPS,
            ],
        )
        return _read_claimed(cursor.fetchone())


def _read_claimed(row) -> Step | None:
    if row is None:
        return None
    step, run, workflow, version = _CLAIMED.read(row)
    rows.set_cached(step, "run", run)
    rows.set_cached(run, "workflow", workflow)
    rows.set_cached(run, "version", version)
    step.stopped = bool(row[_CLAIMED.width()])
    step.lookup_token = row[_CLAIMED.width() + 1]
    return step


def _claim(step_id: int) -> Step | None:
    """Compare-and-swap: pending, or running with an expired lease (its worker died)."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.BATON_STEP_LEASE_S)
    step = _claimed_at_once(step_id, now, lease) or _claim_after_reading(step_id, now, lease)
    if step is None:
        return None
    run = step.run
    with _writing():
        started = []
        if run.status == Run.QUEUED and rows.update(
            Run,
            "id = %s AND status = %s",
            [run.pk, Run.QUEUED],
            values={"status": Run.RUNNING, "started_at": now},
        ):
            run.status, run.started_at = Run.RUNNING, now
            started.append(("run.status", {"status": Run.RUNNING}))
        events.append_events(
            run.pk, [*started, ("step.started", _step_payload(step, attempt=step.attempt))]
        )
    return step


def _claim_after_reading(step_id: int, now, lease) -> Step | None:
    """Read the step, then swap it to running if it can run now: the claim of a step that
    _claimed_at_once did not take (it cannot run now, or the database is SQLite)."""
    step = _claimed_row(step_id)
    if step is None:
        return None
    run = step.run
    if run.status in Run.TERMINAL:
        Step.objects.filter(pk=step_id, status=Step.PENDING).update(status=Step.CANCELLED)
        return None
    if run.status == Run.PAUSED or step.stopped:
        return None  # resume rings the doorbell again
    if step.not_before and step.not_before > now:
        _enqueue_now(step_id, (step.not_before - now).total_seconds())
        return None
    started_at = step.started_at or now
    # The attempt we read is part of the swap: if anyone claimed it since, we lose. On its
    # own (autocommit), so the step row is never held while the run row is awaited.
    _, update, _ = _claim_statements(connection.vendor)
    moment = Step._meta.get_field("lease_until")
    with connection.cursor() as cursor:
        cursor.execute(
            update,
            [
                Step.RUNNING,
                step.attempt + 1,
                moment.get_db_prep_save(lease, connection),
                moment.get_db_prep_save(started_at, connection),
                step_id,
                step.attempt,
                Step.PENDING,
                Step.RUNNING,
                moment.get_db_prep_value(now, connection),
            ],
        )
        claimed = cursor.rowcount
    if not claimed:
        return None
    step.status, step.attempt, step.lease_until = Step.RUNNING, step.attempt + 1, lease
    step.started_at = started_at
    return step


def _enqueue_now(step_id: int, countdown: float | None = None) -> None:
    from runs.tasks import execute_step_task

    execute_step_task.apply_async((step_id,), countdown=countdown)


class _Leases:
    """Renews the leases of every step running in this process, from one thread: every third
    of the lease length, one UPDATE for all of them. A step is renewed only while its attempt
    is still the running one, so a step taken over elsewhere is never kept alive from here."""

    def __init__(self):
        self._held: dict[int, int] = {}  # step id -> attempt
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, step: Step) -> None:
        with self._lock:
            self._held[step.pk] = step.attempt
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._renew, name="baton-leases", daemon=True
                )
                self._thread.start()

    def release(self, step: Step) -> None:
        with self._lock:
            self._held.pop(step.pk, None)

    def _renew(self) -> None:
        lease = settings.BATON_STEP_LEASE_S
        try:
            while True:
                time.sleep(lease / 3)
                with self._lock:
                    held = list(self._held.items())
                    if not held:
                        self._thread = None  # the next hold() starts a new thread
                        return
                mine = Q()
                for step_id, attempt in held:
                    mine |= Q(pk=step_id, attempt=attempt)
                try:
                    Step.objects.filter(mine, status=Step.RUNNING).update(
                        lease_until=timezone.now() + timedelta(seconds=lease)
                    )
                except (OperationalError, InterfaceError):
                    # A dropped connection must not end the renewals (leases would run out
                    # under live steps): the next round opens a new one.
                    log.warning("renewing step leases failed", exc_info=True)
                    connection.close()
        finally:
            connection.close()


_leases = _Leases()


@contextlib.contextmanager
def _writing():
    """The engine's transaction: its events are written together when the block ends."""
    with transaction.atomic(), events.appended_together():
        yield


_RUN = rows.Rows([(Run, "r", ())])


def _lock_run(run_id: int) -> Run:
    """Lock the run row and read it. Every transaction that writes a run and its steps locks
    the run first, so two of them can never wait on each other (PostgreSQL would kill one).
    Written out (runs/rows.py): every step does it. SQLite locks the whole file on the first
    write instead, and has no FOR UPDATE."""
    lock = " FOR NO KEY UPDATE" if connection.features.has_select_for_no_key_update else ""
    found = _RUN.first(
        f"SELECT {_RUN.columns()} FROM {rows.table(Run)} r WHERE r.id = %s{lock}", [run_id]
    )
    if found is None:
        raise Run.DoesNotExist(f"run {run_id} does not exist")
    return found[0]


def _update_mine(ctx: StepContext, add: dict | None = None, **values) -> int:
    """Write our step if it is still ours (running, in our attempt): 1, else 0. Written out
    (runs/rows.py): every step ends with one."""
    return rows.update(
        Step,
        "id = %s AND status = %s AND attempt = %s",
        [ctx.step.pk, Step.RUNNING, ctx.step.attempt],
        values=values,
        add=add,
    )


def _step_fields(ctx: StepContext) -> dict:
    data = dict(ctx.step.input)
    if ctx.messages_log:
        data["messages"] = storable(ctx.messages_log)
    first_run = ctx.step.attempt == 1 and ctx.step.epoch == 0
    calls = [] if first_run and not ctx.made_tool_calls else ToolCall.objects.filter(step=ctx.step)
    return {
        "input": data,
        "tool_calls": [
            {
                "tool": c.tool,
                "arguments": c.approved_arguments or c.arguments,
                "proposed_arguments": c.arguments,
                "result": c.result,
                "error": c.error,
                "status": c.status,
            }
            for c in sorted(calls, key=lambda c: (c.epoch, c.call_index))
        ],
        "agent": ctx.step.agent,
    }


def _save_outcome(
    ctx: StepContext,
    status: str,
    *,
    text: str = "",
    output=None,
    error_kind: str = "",
    error: str = "",
    call: StoredCall | None = None,
) -> bool:
    """Save our step's outcome, with the figures of `call` (stored in this transaction), if
    the step is still ours; else the figures alone."""
    fields = _step_fields(ctx)
    if call is not None:
        fields.update(call.step_values)
    text, output, error = storable(text), storable(output), storable(error)
    updated = _update_mine(
        ctx,
        add=call.step_add if call is not None else None,
        status=status,
        output_text=text,
        output=output,
        error_kind=error_kind,
        error=error,
        finished_at=timezone.now(),
        lease_until=None,
        **fields,
    )
    if updated:
        ctx.step.status = status
        ctx.step.output = output
        ctx.step.output_text = text
        kind = {
            "succeeded": "step.finished",
            "failed": "step.failed",
            "cancelled": "step.cancelled",
        }.get(status, "step.finished")
        events.append_event(ctx.run.pk, kind, _step_payload(ctx.step, error=error))
    elif call is not None:
        rows.update(Step, "id = %s", [ctx.step.pk], values=call.step_values, add=call.step_add)
    return bool(updated)


def _save_waiting(ctx: StepContext, reason: str) -> None:
    with _writing():
        run = _lock_run(ctx.run.pk)
        if not _update_mine(ctx, status=Step.WAITING, lease_until=None, **_step_fields(ctx)):
            return
        ctx.step.status = Step.WAITING
        events.append_event(ctx.run.pk, "step.waiting", _step_payload(ctx.step, reason=reason))
        if run.status in Run.ACTIVE:
            blocked = "sub-workflow" if ctx.step.kind == "subworkflow" else "approval"
            _set_status(
                run,
                Run.WAITING_APPROVAL if blocked == "approval" else run.status,
                blocked_on=f"{blocked}: {reason}"[:200],
            )


def _after_success(ctx: StepContext, text: str, output) -> None:
    """Save the output and advance, in one transaction with the step's last LLM call (which a
    first attempt stores only now: runs/context.py `record_pending_call`)."""
    from runs import costs

    unrecorded = ctx.unrecorded
    try:
        with _writing():
            run = _lock_run(ctx.run.pk)
            call = ctx.store_pending_call(run)
            saved = _save_outcome(ctx, Step.SUCCEEDED, text=text, output=output, call=call)
            # The run's row in one UPDATE: the call's figures and the node's output.
            values = {}
            if saved and ctx.node["kind"] != "parallel":
                key = ctx.node.get("output_key") or ctx.node["id"]
                run.state, run.updated_at = {**run.state, key: output}, timezone.now()
                values = {"state": run.state, "updated_at": run.updated_at}
            if values or call is not None:
                add = call.run_add if call is not None else None
                rows.update(Run, "id = %s", [run.pk], values=values, add=add)
            if saved:
                _advance(run, ctx.spec, ctx.step, outcome="success")
            if call is not None:
                # Last: the day's rollup row of a busy key is shared by every run using it.
                costs.add_to_daily_usage(call.record)
    except LeaseLost as lost:
        _drop_attempt(ctx, lost)
    except (OperationalError, InterfaceError):
        ctx.unrecorded = unrecorded  # rolled back with the transaction: still to be stored
        raise


def _retry_or_fail(ctx: StepContext, message: str) -> None:
    """Transient failure: retry with exponential backoff and jitter, bounded per agent; then
    the next fallback model; then a failed step."""
    step = ctx.step
    agent = step.agent
    max_retries = agent.max_retries if agent else settings.BATON_DEFAULT_MAX_RETRIES
    model = ctx.current_model(agent) if agent else ""
    attempts = [
        *step.attempts,
        {
            "attempt": step.attempt,
            "error_kind": "transient",
            "error": message[:2000],
            "model": model,
            "at": timezone.now().isoformat(),
        },
    ]
    on_this_model = sum(1 for a in attempts if a.get("model") == model)
    data = dict(step.input)
    if on_this_model >= max_retries + 1:
        fallbacks = agent.fallback_models if agent else []
        index = data.get("fallback_index", 0)
        if index >= len(fallbacks):
            Step.objects.filter(pk=step.pk).update(attempts=attempts)
            ctx.step.attempts = attempts
            _after_failure(
                ctx, "transient", f"gave up after {on_this_model} attempts on {model}: {message}"
            )
            return
        data["fallback_index"] = index + 1
        on_this_model = 0
    delay = settings.BATON_RETRY_BACKOFF_S * (2 ** max(on_this_model - 1, 0))
    delay = delay * (0.5 + random.random())  # jitter: don't retry in lockstep
    _retry_later(ctx, delay, message, attempts=attempts, input=data, agent=agent)


def _retry_later(ctx: StepContext, delay: float, message: str, **fields) -> None:
    """Put our step back to pending and ring the doorbell again after `delay` seconds."""
    with _writing():
        _lock_run(ctx.run.pk)
        if not _update_mine(
            ctx,
            status=Step.PENDING,
            lease_until=None,
            not_before=timezone.now() + timedelta(seconds=delay),
            **fields,
        ):
            return
        events.append_event(
            ctx.run.pk,
            "step.retrying",
            _step_payload(
                ctx.step, status=Step.PENDING, error=message[:500], delay_s=round(delay, 2)
            ),
        )
        _enqueue(ctx.step.pk, countdown=delay)


def _after_failure(ctx: StepContext, kind: str, message: str) -> None:
    """A failed step: its failure edge; else an escalation (semantic); else the branch's join
    policy; else the run fails with the reason."""
    failure_edges = [
        e for e in ctx.spec["edges"] if e["source"] == ctx.node["id"] and e.get("on") == "failure"
    ]
    attempts = [
        *ctx.step.attempts,
        {
            "attempt": ctx.step.attempt,
            "error_kind": kind,
            "error": message[:2000],
            "at": timezone.now().isoformat(),
        },
    ]
    ctx.step.attempts = attempts
    if (
        kind == "semantic"
        and not failure_edges
        and ctx.node.get("escalate", True)
        and ctx.node["kind"] == "agent"
    ):
        Step.objects.filter(pk=ctx.step.pk).update(attempts=attempts)
        last = ctx.messages_log[-1]["content"] if ctx.messages_log else ""
        try:
            ctx.ask_human(
                "escalation",
                f"Output of {ctx.node['id']} needs a human: {message}"[:300],
                {"output": last, "error": message},
            )
        except RuntimeError:
            pass  # no approvals app: the run fails below
        else:
            _save_waiting(ctx, message)
            return
    with _writing():
        run = _lock_run(ctx.run.pk)
        Step.objects.filter(pk=ctx.step.pk).update(attempts=attempts)
        if not _save_outcome(ctx, Step.FAILED, error_kind=kind, error=message):
            return
        _advance(run, ctx.spec, ctx.step, outcome="failure", error=message)


def _after_rejection(ctx: StepContext, reason: str) -> None:
    with _writing():
        run = _lock_run(ctx.run.pk)
        if not _save_outcome(
            ctx,
            Step.SUCCEEDED,
            text=f"rejected: {reason}",
            output={"approved": False, "reason": reason},
        ):
            return
        _advance(run, ctx.spec, ctx.step, outcome="rejected", error=reason)


def _after_budget_breach(ctx: StepContext, breach: BudgetExceeded) -> None:
    policy = (ctx.run.budget or {}).get("policy", "stop")
    if (
        policy == "ask"
        and breach.suggested_raise is not None
        and not ctx.step.input.get("budget_asked")
    ):
        ctx.step.input["budget_asked"] = True
        if breach.limit == "spend_cap":
            # The figures of the cap (which one, spend, cap, allowance so far): approving
            # lets this run go past it by `raise_by`; the cap itself stays as it is.
            title = f"Let run {ctx.run.pk} go past the {breach.details['cap_name']}?"
            figures = breach.details
        else:
            title = f"Raise the {breach.limit} budget of run {ctx.run.pk}?"
            figures = {"budget": ctx.run.budget}
        try:
            # The request and the step's waiting status commit together: a decision made in
            # between would find the step still running and be dropped, leaving it waiting.
            with _writing():
                ctx.ask_human(
                    "budget",
                    title,
                    {
                        "limit": breach.limit,
                        "raise_by": str(breach.suggested_raise),
                        "message": breach.message,
                        **figures,
                    },
                )
                _save_waiting(ctx, breach.message)
        except RuntimeError:
            pass
        else:
            return
    with _writing():
        run = _lock_run(ctx.run.pk)
        if not _save_outcome(ctx, Step.FAILED, error_kind="permanent", error=breach.message):
            return
        _finish_run(run, Run.BUDGET_EXCEEDED, breach.message)


# --- advancing ------------------------------------------------------------------------------


def _advance(run: Run, spec: dict, step: Step, *, outcome: str, error: str = "") -> None:
    """Follow the edges out of a finished step. Call inside a transaction holding the run row.

    1. Pick the edges: a router's chosen edge; every matching success edge (loop edges only
       while under their bound); failure or rejection edges.
    2. A target that is a join records an arrival; any other target gets a new step. Leaving a
       parallel node opens a branch frame on the new steps; arriving at a join closes it.
    3. A failure with no edge: the enclosing join's policy decides, else the run fails.
    4. When nothing is pending, running or waiting, the run is over.
    """
    if run.status in Run.TERMINAL:
        return
    node = node_map(spec)[step.node_id]
    outgoing = [e for e in spec["edges"] if e["source"] == step.node_id]
    if outcome == "success":
        state = {**run.state, "input": run.input}
        candidates = [e for e in outgoing if e.get("on", "success") == "success"]
        if node["kind"] == "router":
            target = (step.output or {}).get("target")
            chosen = [e for e in candidates if e["target"] == target][:1]
        else:
            chosen = [e for e in candidates if nodes.condition_holds(e.get("condition"), state)]
    else:
        chosen = [
            e
            for e in outgoing
            if e.get("on") == ("failure" if outcome == "failure" else "rejected")
        ]
        if not chosen:
            if outcome == "rejected":
                _finish_run(run, Run.FAILED, f"{step.node_id} rejected: {error}")
                return
            if step.branches and _arrive_failed_branch(run, spec, step, error):
                _finish_if_idle(run, spec)
                return
            _finish_run(run, Run.FAILED, f"{step.node_id}: {error}")
            return

    targets = []  # (node, branches) of the steps to create, all at once
    for edge in chosen:
        bound = edge.get("max_iterations")
        if bound:
            key = f"{edge['source']}->{edge['target']}"
            if run.edge_counts.get(key, 0) >= bound:
                continue
            run.edge_counts = {**run.edge_counts, key: run.edge_counts.get(key, 0) + 1}
            run.save(update_fields=["edge_counts", "updated_at"])
        target = node_map(spec)[edge["target"]]
        if target["kind"] == "join":
            _arrive(run, spec, target, step, "succeeded" if outcome == "success" else "failed")
            if run.status in Run.TERMINAL:
                return
        else:
            branches = list(step.branches)
            if node["kind"] == "parallel":
                branches.append([node["id"], edge["target"]])
            targets.append((edge["target"], branches))
    created = bool(targets) and bool(_create_steps(run, spec, targets))
    if run.status in Run.TERMINAL:
        return
    if created and run.status == Run.RUNNING and not run.blocked_on:
        return  # the common case: the run simply goes on
    _finish_if_idle(run, spec, just_succeeded=step if outcome == "success" else None)


# A step as an UPDATE returns it: SQLite's RETURNING takes the table's name, not an alias.
_STEP = rows.Rows([(Step, Step._meta.db_table, ())])


def _arrive(run: Run, spec: dict, join: dict, step: Step, status: str) -> None:
    frame = step.branches[-1] if step.branches else None
    branch = frame[1] if frame else step.node_id
    arrival = {branch: {"status": status, "source": step.node_id}}
    join_step = _add_arrival(run, join, arrival) or _open_join(run, spec, join, frame, arrival)
    _maybe_release_join(run, spec, join, join_step)


def _add_arrival(run: Run, join: dict, arrival: dict) -> Step | None:
    """Add `arrival` to the arrivals of the join step waiting for this fan-out, in one
    statement that returns the step (written out: every branch arrives); None when there is
    no such step yet. The run's lock, which the caller holds, keeps arrivals one at a time."""
    db = rows.connection_itself()
    field = Step._meta.get_field("arrivals")
    if db.vendor == "postgresql":
        merged = "arrivals || CAST(%s AS jsonb)"  # a shallow merge, as {**old, **new}
    else:
        merged = "json_patch(arrivals, %s)"  # SQLite: the same, for one level of keys
    found = _STEP.first(
        f"UPDATE {rows.table(Step)} SET arrivals = {merged} WHERE id = ("
        f"SELECT w.id FROM {rows.table(Step)} w WHERE w.run_id = %s AND w.node_id = %s "
        f"AND w.status = %s ORDER BY w.iteration DESC LIMIT 1) "
        f"RETURNING {_STEP.columns()}",
        [field.get_db_prep_save(arrival, db), run.pk, join["id"], Step.WAITING],
    )
    return found[0] if found else None


def _open_join(run: Run, spec: dict, join: dict, frame: list | None, arrival: dict) -> Step:
    """The join step collecting this fan-out's arrivals, made on its first one (numbered and
    counted on the run by _insert_steps, as every new step)."""
    if frame:
        expected = [
            e["target"]
            for e in spec["edges"]
            if e["source"] == frame[0] and e.get("on", "success") == "success"
        ]
    else:
        expected = [e["source"] for e in spec["edges"] if e["target"] == join["id"]]
    join_step = Step(
        run=run,
        node_id=join["id"],
        kind="join",
        status=Step.WAITING,
        input={"expected": expected, "frame": frame},
        arrivals=arrival,
    )
    _insert_steps([join_step])
    run.step_count += 1
    events.append_event(run.pk, "step.created", _step_payload(join_step))
    return join_step


def _maybe_release_join(run: Run, spec: dict, join: dict, join_step: Step) -> None:
    expected = join_step.input.get("expected") or []
    if not all(b in join_step.arrivals for b in expected):
        return
    failed = [b for b, a in join_step.arrivals.items() if a["status"] != "succeeded"]
    if failed and join.get("on_branch_failure", "fail") == "fail":
        _finish_run(run, Run.FAILED, f"branch(es) {', '.join(failed)} of {join['id']} failed")
        return
    frame = join_step.input.get("frame")
    outer = (
        Step.objects.filter(run=run, node_id=frame[0]).order_by("-iteration").first()
        if frame
        else None
    )
    Step.objects.filter(pk=join_step.pk).update(
        status=Step.PENDING, branches=outer.branches if outer else []
    )
    events.append_event(run.pk, "step.created", _step_payload(join_step, status=Step.PENDING))
    _enqueue(join_step.pk)


def _arrive_failed_branch(run: Run, spec: dict, step: Step, error: str) -> bool:
    """A branch step failed with no failure edge: tell the join downstream of its branch."""
    frame = step.branches[-1]
    join = _join_after(spec, frame[0])
    if join is None:
        return False
    if join.get("on_branch_failure", "fail") == "fail":
        _finish_run(run, Run.FAILED, f"{step.node_id} failed in branch {frame[1]}: {error}")
        return True
    _arrive(run, spec, join, step, "failed")
    return True


def _join_after(spec: dict, parallel_id: str) -> dict | None:
    """The first join reachable from a parallel node (breadth-first over success edges)."""
    by_id = node_map(spec)
    seen, queue = {parallel_id}, [parallel_id]
    while queue:
        current = queue.pop(0)
        for edge in spec["edges"]:
            if edge["source"] == current and edge["target"] not in seen:
                if by_id[edge["target"]]["kind"] == "join":
                    return by_id[edge["target"]]
                seen.add(edge["target"])
                queue.append(edge["target"])
    return None


def _finish_if_idle(run: Run, spec: dict, just_succeeded: Step | None = None) -> None:
    """End the run when nothing is left to do; its result is the output of the step that
    succeeded last (`just_succeeded`, when the caller holds it: it finished under the run's
    lock just now, so no other step finished after it)."""
    open_steps = _open_steps(run)
    # Anything but a join waiting for branches keeps the run going.
    if any(status != Step.WAITING or kind != "join" for status, kind in open_steps):
        _refresh_status(run, open_steps)
        return
    stuck = (
        Step.objects.filter(run=run, status=Step.WAITING, kind="join").first()
        if open_steps
        else None
    )
    if stuck is not None:
        missing = [b for b in stuck.input.get("expected", []) if b not in stuck.arrivals]
        _finish_run(
            run,
            Run.FAILED,
            f"join {stuck.node_id} can never complete: no branch left for {', '.join(missing)}",
        )
        return
    last = just_succeeded or (
        Step.objects.filter(run=run, status=Step.SUCCEEDED).order_by("-finished_at", "-id").first()
    )
    run.refresh_from_db(fields=["state"])
    if last is None:
        result = None
    elif last.kind in ("supervisor", "vote", "debate") and isinstance(last.output, dict):
        result = last.output.get("result")
    else:
        result = last.output
    _finish_run(run, Run.SUCCEEDED, "", result=result)


def _open_steps(run: Run) -> list[tuple[str, str]]:
    """(status, kind) of the run's pending, running and waiting steps, in one query (written
    out: the engine asks after every step that made no new one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT status, kind FROM {rows.table(Step)} "
            "WHERE run_id = %s AND status IN (%s, %s, %s)",
            [run.pk, Step.PENDING, Step.RUNNING, Step.WAITING],
        )
        return cursor.fetchall()


def _refresh_status(run: Run, open_steps: list[tuple[str, str]] | None = None) -> None:
    """Running while any step is pending or running; else waiting on whatever step waits
    (a join waiting for its branches does not count)."""
    if run.status not in (Run.RUNNING, Run.WAITING_APPROVAL, Run.QUEUED):
        return
    if open_steps is None:
        open_steps = _open_steps(run)
    busy = any(status != Step.WAITING for status, _ in open_steps)
    waiting = {kind for status, kind in open_steps if status == Step.WAITING and kind != "join"}
    if waiting and not busy:
        blocked = "sub-workflow" if "subworkflow" in waiting else "approval"
        _set_status(
            run, Run.WAITING_APPROVAL if blocked == "approval" else Run.RUNNING, blocked_on=blocked
        )
    else:
        _set_status(run, Run.RUNNING, blocked_on="")


def _set_status(
    run: Run, status: str, *, blocked_on: str | None = None, error: str = "", also: tuple = ()
) -> None:
    """Save the run's status (with `also`, fields the caller changed on `run`, in the same
    UPDATE) and append a run.status event when it changed."""
    changed = run.status != status or (blocked_on is not None and blocked_on != run.blocked_on)
    if not changed and not error and not also:
        return
    run.status = status
    fields = ["status", "updated_at", *also]
    if blocked_on is not None:
        run.blocked_on = blocked_on
        fields.append("blocked_on")
    if error:
        run.error = error
        fields.append("error")
    run.save(update_fields=fields)
    if changed:
        events.append_event(
            run.pk,
            "run.status",
            {"status": status, "error": run.error, "blocked_on": run.blocked_on},
        )


def _finish_run(run: Run, status: str, error: str, *, result=None) -> None:
    """End a run; cancel what is left of it; wake the parent run of a sub-workflow."""
    if run.status in Run.TERMINAL:
        return
    now = timezone.now()
    run.finished_at = now
    run.result = result
    Step.objects.filter(run=run, status__in=(Step.PENDING, Step.RUNNING, Step.WAITING)).update(
        status=Step.CANCELLED, finished_at=now, lease_until=None
    )
    _set_status(run, status, blocked_on="", error=error[:5000], also=("finished_at", "result"))
    if run.parent_step_id:
        parent = Step.objects.filter(pk=run.parent_step_id, status=Step.WAITING).first()
        if parent is not None:
            Step.objects.filter(pk=parent.pk).update(status=Step.PENDING)
            _enqueue(parent.pk)


# --- human decisions ------------------------------------------------------------------------


def apply_decision(request, *, approved: bool, payload: dict | None, comment: str) -> None:
    """Resume a run after a human (or the deadline) decided an approval request. Called once,
    inside the approvals app's decision transaction."""
    run = _lock_run(request.run_id)
    step = Step.objects.select_for_update().get(pk=request.step_id)
    if run.status in Run.TERMINAL or step.status != Step.WAITING:
        return
    data = {**step.input, "approval_open": False}
    if request.kind == "tool_call" and request.tool_call_id:
        call_updates = {
            "status": ToolCall.APPROVED if approved else ToolCall.REJECTED,
            "decision_note": comment,
        }
        if approved and payload is not None:
            call_updates["approved_arguments"] = payload.get("arguments", payload)
        ToolCall.objects.filter(pk=request.tool_call_id, status=ToolCall.AWAITING_APPROVAL).update(
            **call_updates
        )
    elif request.kind == "node":
        data["decision"] = {"approved": approved, "comment": comment, "payload": payload}
    elif request.kind == "escalation":
        if not approved:
            _finish_run(run, Run.FAILED, f"{step.node_id}: escalation rejected: {comment}")
            return
        edited = (payload or request.payload or {}).get("output")
        Step.objects.filter(pk=step.pk).update(input=data)
        step.input = data
        spec = run.version.get_spec()
        Step.objects.filter(pk=step.pk).update(
            status=Step.SUCCEEDED,
            output_text=str(edited),
            output=edited,
            finished_at=timezone.now(),
        )
        step.status = Step.SUCCEEDED
        step.output = edited
        key = node_map(spec)[step.node_id].get("output_key") or step.node_id
        run.state = {**run.state, key: edited}
        run.save(update_fields=["state", "updated_at"])
        events.append_event(run.pk, "step.finished", _step_payload(step))
        _advance(run, spec, step, outcome="success")
        return
    elif request.kind == "budget":
        from runs import costs

        decided = payload or request.payload
        limit = decided.get("limit", "max_cost")
        if not approved:
            if limit == "spend_cap":
                reason = f"{decided.get('message', 'spend cap reached')}; going past the cap"
            else:
                reason = "budget raise"
            _finish_run(run, Run.BUDGET_EXCEEDED, f"{reason} rejected: {comment}")
            return
        raise_by = Decimal(str(decided.get("raise_by", "0")))
        budget = dict(run.budget)
        if limit == "spend_cap":
            budget = costs.grant_cap_allowance(budget, decided.get("cap", ""), raise_by)
        elif limit == "max_tokens":
            budget["max_tokens"] = int(budget.get("max_tokens") or 0) + int(raise_by)
        else:
            budget["max_cost"] = str(Decimal(str(budget.get("max_cost") or 0)) + raise_by)
        run.budget = budget
        run.save(update_fields=["budget", "updated_at"])
        data["budget_asked"] = False
    Step.objects.filter(pk=step.pk).update(status=Step.PENDING, input=data, lease_until=None)
    events.append_event(run.pk, "step.resumed", _step_payload(step, status=Step.PENDING))
    _set_status(run, Run.RUNNING if run.status != Run.PAUSED else Run.PAUSED, blocked_on="")
    if run.status != Run.PAUSED:
        _enqueue(step.pk)


# --- controls -------------------------------------------------------------------------------


def can_cancel(run: Run) -> bool:
    return run.status in Run.ACTIVE


def can_pause(run: Run) -> bool:
    return run.status in (Run.QUEUED, Run.RUNNING, Run.WAITING_APPROVAL)


def can_resume(run: Run) -> bool:
    return run.status == Run.PAUSED


def can_retry(run: Run) -> bool:
    return (
        run.status in (Run.FAILED, Run.BUDGET_EXCEEDED, Run.CANCELLED)
        and run.steps.filter(status__in=(Step.FAILED, Step.CANCELLED)).exists()
    )


def _audit(run: Run, action: str, user) -> None:
    events.append_event(
        run.pk,
        "run.control",
        {"action": action, "user": getattr(user, "username", None) or "system"},
    )


def cancel_run(run: Run, user) -> None:
    with _writing():
        run = _lock_run(run.pk)
        if not can_cancel(run):
            raise RunControlError(f"A {run.get_status_display().lower()} run cannot be cancelled.")
        Run.objects.filter(pk=run.pk).update(cancel_requested=True)
        _audit(run, "cancel", user)
        _finish_run(run, Run.CANCELLED, f"cancelled by {getattr(user, 'username', 'system')}")


def pause_run(run: Run, user) -> None:
    with _writing():
        run = _lock_run(run.pk)
        if not can_pause(run):
            raise RunControlError(f"A {run.get_status_display().lower()} run cannot be paused.")
        _audit(run, "pause", user)
        _set_status(run, Run.PAUSED, blocked_on="paused")


def resume_run(run: Run, user) -> None:
    with _writing():
        run = _lock_run(run.pk)
        if not can_resume(run):
            raise RunControlError("Only a paused run can be resumed.")
        if stop_everything_on():
            raise RunControlError("The global stop switch is on; turn it off first.")
        _audit(run, "resume", user)
        _set_status(run, Run.RUNNING if run.started_at else Run.QUEUED, blocked_on="")
        for step_id in run.steps.filter(status=Step.PENDING).values_list("pk", flat=True):
            _enqueue(step_id)
        if run.started_at:  # never started: stays queued until a worker claims a step
            _refresh_status(run)


def retry_run(run: Run, user) -> None:
    """Run the failed (and cancelled) steps again, with fresh LLM calls, and carry on."""
    with _writing():
        run = _lock_run(run.pk)
        if not can_retry(run):
            raise RunControlError("Only a failed, cancelled or over-budget run can be retried.")
        _audit(run, "retry", user)
        steps = list(run.steps.filter(status__in=(Step.FAILED, Step.CANCELLED)))
        for step in steps:
            Step.objects.filter(pk=step.pk).update(
                status=Step.WAITING if step.kind == "join" and step.arrivals else Step.PENDING,
                epoch=F("epoch") + 1,
                error="",
                error_kind="",
                finished_at=None,
                not_before=None,
                lease_until=None,
                input={
                    k: v
                    for k, v in step.input.items()
                    if k not in ("fallback_index", "approval_open", "budget_asked")
                },
            )
        Run.objects.filter(pk=run.pk).update(
            cancel_requested=False,
            finished_at=None,
            error="",
            result=None,
            budget={**run.budget, "max_wall_s": None},
        )
        run.refresh_from_db()
        _set_status(run, Run.RUNNING, blocked_on="")
        for step in steps:
            if step.kind != "join" or not step.arrivals:
                _enqueue(step.pk)


def fork_run(step: Step, user, *, input: dict | None = None, overrides: dict | None = None) -> Run:
    """A new run of the same version that reuses the outputs recorded before `step` and runs
    from `step` on, with an edited input, prompt or model."""
    source = step.run
    spec = source.version.get_spec()
    data = validate_input(spec, source.input if input is None else input)
    with _writing():
        run = Run.objects.create(
            workflow=source.workflow,
            version=source.version,
            input=data,
            state=dict(data),
            started_by=user if user is not None and user.is_authenticated else None,
            budget=source.budget,
            overrides=overrides or {},
            parent=source,
            forked_from_step=step,
            status=Run.RUNNING,
            started_at=timezone.now(),
        )
        events.append_event(run.pk, "run.created", {"status": run.status, "forked_from": source.pk})
        state = dict(data)
        earlier = source.steps.filter(
            status=Step.SUCCEEDED, created_at__lt=step.created_at, branches=[]
        ).exclude(kind="join")
        by_id = node_map(spec)
        for old in earlier.order_by("created_at", "id"):
            Step.objects.create(
                run=run,
                node_id=old.node_id,
                kind=old.kind,
                iteration=old.iteration,
                agent=old.agent,
                status=Step.SUCCEEDED,
                input=old.input,
                output_text=old.output_text,
                output=old.output,
                tool_calls=old.tool_calls,
                model=old.model,
                reused_from=old,
                started_at=old.started_at,
                finished_at=old.finished_at,
            )
            if old.kind != "parallel" and old.node_id in by_id:
                state[by_id[old.node_id].get("output_key") or old.node_id] = old.output
        run.state = state
        run.step_count = earlier.count()
        run.save(update_fields=["state", "step_count"])
        _audit(source, f"fork from {step.node_id} into run {run.pk}", user)
        _create_step(run, spec, step.node_id, branches=[])
    return run


def stop_everything_on() -> bool:
    return Switch.objects.filter(name=STOP_EVERYTHING, on=True).exists()


def set_stop_everything(on: bool, user) -> int:
    """The global stop switch: on pauses every active run at once. Returns how many paused."""
    paused = 0
    with _writing():
        Switch.objects.update_or_create(
            name=STOP_EVERYTHING,
            defaults={"on": on, "changed_by": user if getattr(user, "pk", None) else None},
        )
        if on:
            for run in Run.objects.select_for_update(no_key=True).filter(
                status__in=(Run.QUEUED, Run.RUNNING, Run.WAITING_APPROVAL)
            ):
                _audit(run, "stop everything", user)
                _set_status(run, Run.PAUSED, blocked_on="global stop switch")
                paused += 1
    return paused


# --- the sweeper ----------------------------------------------------------------------------


def sweep_stuck_steps() -> dict:
    """Find work that fell through the cracks and put it back (Celery beat, every few seconds).

    1. Running steps whose lease expired (their worker died): ring the doorbell again; after
       too many lost attempts, fail the step.
    2. Pending steps of active runs nobody claimed for a while (a lost message): ring again.
    3. Parallel branches past their branch_timeout_s: mark them timed out at the join.
    4. Runs past their wall-clock limit: end them as budget_exceeded.
    """
    now = timezone.now()
    requeued = failed = timed_out = over_time = 0
    close_old_connections()
    for step in Step.objects.filter(status=Step.RUNNING, lease_until__lt=now).select_related("run")[
        :500
    ]:
        if step.attempt >= MAX_CLAIMS:
            with _writing():
                run = _lock_run(step.run_id)
                if Step.objects.filter(pk=step.pk, status=Step.RUNNING, lease_until__lt=now).update(
                    status=Step.FAILED,
                    error_kind="transient",
                    error=f"worker lost {step.attempt} times",
                    finished_at=now,
                ):
                    _finish_run(
                        run, Run.FAILED, f"{step.node_id}: worker lost {step.attempt} times"
                    )
                    failed += 1
            continue
        _enqueue_now(step.pk)
        requeued += 1
    stale = now - timedelta(seconds=max(settings.BATON_STEP_LEASE_S * 3, 15))
    for step_id in (
        Step.objects.filter(
            status=Step.PENDING, created_at__lt=stale, run__status__in=(Run.QUEUED, Run.RUNNING)
        )
        .filter(Q(not_before__isnull=True) | Q(not_before__lt=stale))
        .values_list("pk", flat=True)[:500]
    ):
        _enqueue_now(step_id)
        requeued += 1
    timed_out = _time_out_branches(now)
    for run in Run.objects.filter(
        status__in=(Run.RUNNING, Run.WAITING_APPROVAL), started_at__isnull=False
    )[:500]:
        wall = (run.budget or {}).get("max_wall_s")
        if wall and (now - run.started_at).total_seconds() > wall:
            with _writing():
                locked = _lock_run(run.pk)
                _finish_run(locked, Run.BUDGET_EXCEEDED, f"run wall-clock limit of {wall}s reached")
                over_time += 1
    return {"requeued": requeued, "failed": failed, "timed_out": timed_out, "over_time": over_time}


def _time_out_branches(now) -> int:
    count = 0
    joins = Step.objects.filter(
        kind="join", status=Step.WAITING, run__status__in=(Run.RUNNING, Run.WAITING_APPROVAL)
    )
    for join_step in joins.select_related("run", "run__version")[:200]:
        frame = join_step.input.get("frame")
        if not frame:
            continue
        spec = join_step.run.version.get_spec()
        parallel = node_map(spec).get(frame[0]) or {}
        timeout = parallel.get("branch_timeout_s")
        fan_out = (
            Step.objects.filter(run=join_step.run, node_id=frame[0], status=Step.SUCCEEDED)
            .order_by("-iteration")
            .first()
        )
        if not timeout or fan_out is None or fan_out.finished_at is None:
            continue
        if (now - fan_out.finished_at).total_seconds() <= timeout:
            continue
        with _writing():
            run = _lock_run(join_step.run_id)
            locked = Step.objects.select_for_update().get(pk=join_step.pk)
            if locked.status != Step.WAITING:
                continue
            missing = [b for b in locked.input.get("expected", []) if b not in locked.arrivals]
            for branch in missing:
                _cancel_branch(run, frame, branch, now)
                locked.arrivals = {**locked.arrivals, branch: {"status": "timeout", "source": None}}
            locked.save(update_fields=["arrivals"])
            events.append_event(
                run.pk, "step.timeout", _step_payload(locked, branches=missing, timeout_s=timeout)
            )
            _maybe_release_join(run, spec, node_map(spec)[locked.node_id], locked)
            count += 1
    return count


def _cancel_branch(run: Run, frame: list, branch: str, now) -> None:
    for step in Step.objects.filter(run=run, status__in=(Step.PENDING, Step.RUNNING, Step.WAITING)):
        if [frame[0], branch] in step.branches:
            Step.objects.filter(pk=step.pk).update(
                status=Step.CANCELLED, error="branch timed out", finished_at=now
            )


def wait_for(run: Run, timeout_s: float = 60.0, poll_s: float = 0.1) -> Run:
    """Block until a run is terminal (or waiting for a human). For the CLI and tests."""

    deadline = time.monotonic() + timeout_s
    while True:
        run.refresh_from_db()
        if run.status in Run.TERMINAL or run.status == Run.WAITING_APPROVAL:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run.pk} still {run.status} after {timeout_s}s")
        time.sleep(poll_s)
