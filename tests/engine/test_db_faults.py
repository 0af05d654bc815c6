"""Database trouble under a running step (see docs/reliability.md, what `make chaos` found):
an attempt that lost its lease, or a statement the database cancelled, never fails the run."""

import time
from datetime import timedelta

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from runs import engine
from runs.models import Run, Step, UsageRecord
from runs.tasks import execute_step_task
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_attempt_that_records_a_call_second_goes_on_with_the_recorded_answer(
    celery_worker, alice, fake_llm
):
    """Attempt 1's lease runs out while its LLM call is in flight; attempt 2 takes over and
    makes the same call; attempt 1 records it first. Attempt 2's insert of the same call index
    must not fail the run."""
    make_agent("writer", model=fake_llm.model(), api_base=fake_llm.base_url)
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    fake_llm.fail_next({"hang": 2}, {"hang": 4})
    run = engine.start_run(workflow.latest_version(), {"topic": "overlap"}, alice)
    wait_until(lambda: fake_llm.request_count == 1)
    step = run.steps.get()
    Step.objects.filter(pk=step.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    execute_step_task.delay(step.pk)  # a redelivered doorbell
    run = engine.wait_for(run, timeout_s=30)
    assert run.status == Run.SUCCEEDED, run.error
    # Attempt 1's call is the one on record, its figures on the step it no longer owned and on
    # the run; attempt 2 replayed it and added nothing; both reservations were given back.
    record = UsageRecord.objects.get(run=run)
    step = run.steps.get()
    assert (step.attempt, step.total_tokens, step.cost) == (2, record.total_tokens, record.cost)
    assert (run.total_tokens, run.cost) == (record.total_tokens, record.cost)
    assert (run.reserved_tokens, run.reserved_cost) == (0, 0)


@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"), reason="needs PostgreSQL"
)
def test_a_cancelled_statement_is_retried_not_a_permanent_failure(celery_worker, alice, fake_llm):
    make_agent("writer", model=fake_llm.model(), api_base=fake_llm.base_url)
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    fake_llm.fail_next({"hang": 2})
    run = engine.start_run(workflow.latest_version(), {"topic": "cancel"}, alice)
    wait_until(lambda: fake_llm.request_count == 1)
    # Lock the run row, so the step's recording of its LLM call waits on it, then cancel that
    # statement as a statement_timeout would.
    _cancel_statements_waiting_for(f"SELECT 1 FROM runs_run WHERE id = {run.pk} FOR UPDATE")
    run = engine.wait_for(run, timeout_s=60)
    assert run.status == Run.SUCCEEDED, run.error
    assert fake_llm.request_count == 1  # the retry replays the call, it does not pay again


@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"), reason="needs PostgreSQL"
)
def test_a_call_stored_in_a_rolled_back_outcome_is_stored_again_not_paid_again(
    celery_worker, alice, fake_llm
):
    """A first attempt stores its last call in the transaction that saves the outcome; the
    daily rollup is that transaction's last write. Cancel it there: the call must be stored
    on the way out and replayed by the retry."""
    make_agent("writer", model=fake_llm.model(), api_base=fake_llm.base_url)
    workflow = make_workflow(pipeline_spec("writer"), owner=alice)
    first = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "a"}, alice))
    assert first.status == Run.SUCCEEDED, first.error  # its call made today's rollup row
    fake_llm.reset()
    fake_llm.fail_next({"hang": 2})
    run = engine.start_run(workflow.latest_version(), {"topic": "b"}, alice)
    wait_until(lambda: fake_llm.request_count == 1)
    _cancel_statements_waiting_for("SELECT 1 FROM runs_usagedaily FOR UPDATE")
    run = engine.wait_for(run, timeout_s=60)
    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.get().attempt == 2  # the outcome transaction did roll back
    assert fake_llm.request_count == 1
    assert UsageRecord.objects.filter(run=run).count() == 1


def _cancel_statements_waiting_for(lock_sql: str) -> None:
    """Hold the lock `lock_sql` takes until a statement of the worker waits for it, then
    cancel that statement, as a statement_timeout would."""
    params = connection.get_connection_params()
    with (
        psycopg.connect(
            **{k: v for k, v in params.items() if k != "cursor_factory"}, autocommit=False
        ) as locker,
        psycopg.connect(
            **{k: v for k, v in params.items() if k != "cursor_factory"}, autocommit=True
        ) as admin,
    ):
        locker.execute(lock_sql)
        waiting = []

        def blocked():
            waiting[:] = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ).fetchall()
            return bool(waiting)

        wait_until(blocked, timeout_s=20)
        for (pid,) in waiting:
            admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        locker.rollback()
