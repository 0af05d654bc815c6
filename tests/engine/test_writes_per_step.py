"""What a step writes: a fan-out's branch steps go in together, and a first attempt's LLM call
is stored in the transaction that saves its outcome. Counts of statements, not timings: the
figures of `make bench` (docs/benchmarks.md) rest on them."""

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs import engine
from runs.models import Run, Step, UsageRecord
from tests.factories import fan_out_spec, make_agent, pipeline_spec, silent_run

pytestmark = pytest.mark.integration  # the fan-out rings its branches' doorbells

BRANCHES = [f"angle{i}" for i in range(10)]
ADDS_TOKENS = '"total_tokens" = "total_tokens" +'  # rows.update(add=...)


def statements(captured, prefix: str) -> list[str]:
    return [q["sql"] for q in captured.captured_queries if q["sql"].startswith(prefix)]


@pytest.mark.django_db(transaction=True)
def test_a_fan_out_inserts_its_ten_branch_steps_in_one_statement(alice, celery_worker):
    """The branches' doorbells ring a real worker: the fixture lets it go idle before the
    tables are flushed (a worker writing during the flush deadlocks it)."""
    for name in BRANCHES:
        make_agent(name)
    spec = fan_out_spec(*BRANCHES)
    run, fan = silent_run(spec, alice)

    with CaptureQueriesContext(connection) as captured:
        engine.execute_step(fan.pk)

    inserts = [q["sql"] for q in captured.captured_queries if 'INSERT INTO "runs_step"' in q["sql"]]
    assert len(inserts) == 1
    if connection.vendor == "postgresql":  # the same statement counts them on the run
        assert inserts[0].startswith("WITH counted AS (UPDATE")
        assert not [s for s in statements(captured, 'UPDATE "runs_run"') if "step_count" in s]
    assert Run.objects.get(pk=run.pk).step_count == 1 + len(BRANCHES)
    branches = run.steps.filter(node_id__in=BRANCHES)
    assert sorted(branches.values_list("node_id", flat=True)) == sorted(BRANCHES)
    assert all(s.branches == [["fan", s.node_id]] for s in branches)
    assert run.steps.filter(node_id__in=BRANCHES, iteration=0).count() == len(BRANCHES)
    events = list(run.events.filter(kind="step.created").values_list("payload", flat=True))
    assert {e["node_id"] for e in events} >= set(BRANCHES)


@pytest.mark.django_db(transaction=True)
def test_a_first_attempt_stores_its_call_with_its_outcome(alice):
    make_agent("writer")
    run, step = silent_run(pipeline_spec("writer"), alice)

    with CaptureQueriesContext(connection) as captured:
        engine.execute_step(step.pk)

    # The claim's event write, then one for the call, the outcome and the run's end together;
    # on PostgreSQL each is one statement that takes the seqs too.
    writes = [
        q["sql"] for q in captured.captured_queries if 'INSERT INTO "runs_runevent"' in q["sql"]
    ]
    assert len(writes) == 2
    if connection.vendor == "postgresql":
        assert all(sql.startswith("WITH taken AS (UPDATE") for sql in writes)
        assert not statements(captured, 'UPDATE "runs_run" SET last_seq')
        # The claim of a step that can run is one UPDATE returning it with its run: no read.
        first = captured.captured_queries[0]["sql"]
        assert first.startswith('UPDATE "runs_step" s SET') and "RETURNING" in first
        assert not [s for s in statements(captured, "SELECT") if '"runs_step" s INNER' in s]
    # The call's record needs no savepoint: a conflict does not break the transaction.
    assert not statements(captured, "SAVEPOINT")
    # The call's figures go with the step's outcome and with the run's state: each row is
    # written once for them.
    step_figures = [s for s in statements(captured, 'UPDATE "runs_step"') if ADDS_TOKENS in s]
    assert len(step_figures) == 1 and '"status"' in step_figures[0]
    run_figures = [s for s in statements(captured, 'UPDATE "runs_run"') if ADDS_TOKENS in s]
    assert len(run_figures) == 1 and '"state"' in run_figures[0]
    run.refresh_from_db()
    assert run.status == Run.SUCCEEDED, run.error
    record = UsageRecord.objects.get(run=run)
    assert run.total_tokens == record.total_tokens > 0
    assert (run.cost, run.reserved_tokens, run.reserved_cost) == (record.cost, 0, 0)
    assert run.state["writer"]
    step = run.steps.get()
    assert step.status == Step.SUCCEEDED
    assert (step.total_tokens, step.cost, step.model) == (
        record.total_tokens,
        record.cost,
        record.model,
    )
    kinds = list(run.events.order_by("seq").values_list("kind", flat=True))
    assert kinds[-4:] == ["llm.called", "run.totals", "step.finished", "run.status"]


@pytest.mark.django_db(transaction=True)
def test_an_attempt_whose_call_another_recorded_first_gives_back_its_reservation(alice):
    """Another attempt took the step over and recorded call 0 first: this attempt's outcome
    transaction finds the record there, rolls back, and then gives back the budget its own
    copy of the call held; the other attempt's record stays the only one."""
    make_agent("writer")
    run, step = silent_run(pipeline_spec("writer"), alice)
    Run.objects.filter(pk=run.pk).update(budget={"max_tokens": 100_000})
    theirs = UsageRecord.objects.create(
        run=run,
        step=step,
        epoch=0,
        call_index=0,
        model="scripted/baton",
        total_tokens=7,
        at=timezone.now(),
    )

    engine.execute_step(step.pk)

    run.refresh_from_db()
    assert (run.reserved_tokens, run.reserved_cost) == (0, 0)
    assert list(UsageRecord.objects.filter(step=step)) == [theirs]
    assert run.total_tokens == 0  # the totals are the other attempt's to add
    assert run.steps.get().status == Step.RUNNING  # not ours to finish


@pytest.mark.django_db(transaction=True)
def test_events_are_numbered_after_the_runs_last_seq_in_the_order_appended(alice):
    from runs import events

    run, _ = silent_run(pipeline_spec("writer"), alice)
    last = Run.objects.get(pk=run.pk).last_seq
    with transaction.atomic(), events.appended_together():
        events.append_event(run.pk, "bench.a", {"n": 1})
        events.append_events(run.pk, [("bench.b", {"n": 2}), ("bench.c", None)])

    written = list(run.events.filter(seq__gt=last).order_by("seq"))
    assert [(e.seq - last, e.kind, e.payload) for e in written] == [
        (1, "bench.a", {"n": 1}),
        (2, "bench.b", {"n": 2}),
        (3, "bench.c", {}),
    ]
    assert Run.objects.get(pk=run.pk).last_seq == last + 3
    with pytest.raises(Run.DoesNotExist), transaction.atomic():
        events.append_event(run.pk + 1000, "bench.none")


@pytest.mark.django_db(transaction=True)
def test_a_branch_arrives_at_its_join_in_one_statement(alice, celery_worker):
    """The first arrival makes the join step with its arrival in it; each later one adds its
    own with one UPDATE ... RETURNING, no locked read first. Branch steps are made by hand
    here, so no doorbell rings for them; the last arrival rings the join's, and the worker
    fixture lets the worker finish it before the tables are flushed."""
    names = ["left", "middle", "right"]
    for name in names:
        make_agent(name)
    spec = fan_out_spec(*names)
    run, _ = silent_run(spec, alice)
    branches = [
        Step.objects.create(run=run, node_id=n, kind="agent", branches=[["fan", n]]) for n in names
    ]
    join = next(n for n in spec["nodes"] if n["id"] == "gather")

    with transaction.atomic():
        locked = engine._lock_run(run.pk)
        engine._arrive(locked, spec, join, branches[0], "succeeded")
        with CaptureQueriesContext(connection) as captured:
            engine._arrive(locked, spec, join, branches[1], "succeeded")

    gather = run.steps.get(node_id="gather")
    assert gather.status == Step.WAITING and gather.input["expected"] == names
    assert gather.arrivals == {
        "left": {"status": "succeeded", "source": "left"},
        "middle": {"status": "succeeded", "source": "middle"},
    }
    assert [q["sql"].split()[0] for q in captured.captured_queries] == ["UPDATE"]

    with transaction.atomic():
        engine._arrive(engine._lock_run(run.pk), spec, join, branches[2], "succeeded")
    gather.refresh_from_db()
    assert set(gather.arrivals) == set(names) and gather.status != Step.WAITING  # released
