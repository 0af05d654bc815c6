"""What a step writes: a fan-out's branch steps go in together, and a first attempt's LLM call
is stored in the transaction that saves its outcome. Counts of statements, not timings: the
figures of `make bench` (docs/benchmarks.md) rest on them."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs import engine
from runs.models import Run, Step, UsageRecord
from tests.factories import fan_out_spec, make_agent, pipeline_spec, silent_run

pytestmark = pytest.mark.integration  # the fan-out rings its branches' doorbells

BRANCHES = [f"angle{i}" for i in range(10)]


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

    assert len(statements(captured, 'INSERT INTO "runs_step"')) == 1
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

    # The claim's event write, then one for the call, the outcome and the run's end together.
    assert len(statements(captured, 'INSERT INTO "runs_runevent"')) == 2
    run.refresh_from_db()
    assert run.status == Run.SUCCEEDED, run.error
    record = UsageRecord.objects.get(run=run)
    assert run.total_tokens == record.total_tokens > 0
    assert run.steps.get().status == Step.SUCCEEDED
    kinds = list(run.events.order_by("seq").values_list("kind", flat=True))
    assert kinds[-4:] == ["llm.called", "run.totals", "step.finished", "run.status"]
