"""A Celery task executes the step it was rung for, then the step that one made ready, in the
same thread (`engine.execute_steps`): a sequential run pays no queue hop between its steps.
Doorbells are observed with Celery's own `before_task_publish` signal."""

import pytest
from celery.signals import before_task_publish

from runs import engine
from runs.models import Run, Step
from tests.factories import fan_out_spec, make_agent, pipeline_spec, silent_run

pytestmark = pytest.mark.integration


@pytest.fixture
def doorbells():
    """The step ids of every execute_step message published while the test runs."""
    rung: list[int] = []

    def record(sender=None, body=None, **_):
        if sender == "runs.tasks.execute_step":
            rung.append(body[0][0])

    before_task_publish.connect(record, weak=False)
    yield rung
    before_task_publish.disconnect(record)


@pytest.mark.django_db(transaction=True)
def test_a_pipeline_runs_to_the_end_in_one_task_without_a_doorbell(alice, doorbells):
    for name in ("researcher", "analyst", "writer"):
        make_agent(name)
    run, first = silent_run(pipeline_spec("researcher", "analyst", "writer"), alice)

    engine.execute_steps(first.pk)

    run.refresh_from_db()
    assert run.status == Run.SUCCEEDED, run.error
    assert list(run.steps.order_by("created_at").values_list("node_id", "status")) == [
        ("researcher", Step.SUCCEEDED),
        ("analyst", Step.SUCCEEDED),
        ("writer", Step.SUCCEEDED),
    ]
    assert doorbells == []


@pytest.mark.django_db(transaction=True)
def test_a_fan_out_keeps_one_branch_and_rings_for_the_others(celery_worker, alice, doorbells):
    for name in ("a", "b", "c"):
        make_agent(name)
    spec = fan_out_spec("a", "b", "c")
    run, fan = silent_run(spec, alice)

    engine.execute_steps(fan.pk)  # the fan step, one branch, and maybe the join: the worker races

    run = engine.wait_for(run, timeout_s=60)
    assert run.status == Run.SUCCEEDED, run.error
    branches = {s.node_id: s.pk for s in run.steps.filter(node_id__in=list("abc"))}
    rung_branches = [step_id for step_id in doorbells if step_id in branches.values()]
    assert len(rung_branches) == 2  # the third ran in this thread, right after the fan step


@pytest.mark.django_db(transaction=True)
def test_a_long_run_goes_back_to_the_queue_after_steps_per_task(celery_worker, alice, doorbells):
    make_agent("writer")
    loops = engine.STEPS_PER_TASK + 5
    spec = pipeline_spec("writer")
    spec["edges"] = [{"source": "writer", "target": "writer", "max_iterations": loops}]
    run, first = silent_run(spec, alice)

    engine.execute_steps(first.pk)

    # This thread executed STEPS_PER_TASK steps and rang for the next one; the worker does the rest.
    handed_back = run.steps.get(iteration=engine.STEPS_PER_TASK)
    assert doorbells == [handed_back.pk]
    run = engine.wait_for(run, timeout_s=60)
    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.filter(status=Step.SUCCEEDED).count() == loops + 1
