"""Cancel, pause/resume, retry, fork and the global stop switch, against a real worker."""

import time

import pytest

from runs import engine
from runs.models import Run, RunEvent, Step
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.integration


def slow_pipeline(owner, fake_llm, latency_ms=800):
    fake_llm.latency_ms = latency_ms
    for name in ("a", "b", "c"):
        make_agent(name, model=fake_llm.model(), api_base=fake_llm.base_url)
    return make_workflow(pipeline_spec("a", "b", "c"), owner=owner)


def wait_until(predicate, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def test_cancel_stops_the_run_before_its_next_call(celery_worker, alice, fake_llm):
    workflow = slow_pipeline(alice, fake_llm)
    run = engine.start_run(workflow.latest_version(), {"topic": "x"}, alice)
    wait_until(lambda: fake_llm.request_count >= 1)
    engine.cancel_run(run, alice)
    run.refresh_from_db()
    assert run.status == Run.CANCELLED and "cancelled by alice" in run.error
    time.sleep(2)
    assert fake_llm.request_count == 1, "a call was made after cancel"
    assert not run.steps.filter(node_id="b").exists()
    assert RunEvent.objects.filter(run=run, kind="run.control", payload__action="cancel").exists()
    with pytest.raises(engine.RunControlError):
        engine.cancel_run(run, alice)


def test_pause_holds_the_next_step_and_resume_continues(celery_worker, alice, fake_llm):
    workflow = slow_pipeline(alice, fake_llm, latency_ms=600)
    run = engine.start_run(workflow.latest_version(), {"topic": "x"}, alice)
    wait_until(lambda: fake_llm.request_count >= 1)
    engine.pause_run(run, alice)
    wait_until(lambda: run.steps.filter(node_id="a", status=Step.SUCCEEDED).exists())
    time.sleep(1.5)
    assert fake_llm.request_count == 1
    assert run.steps.get(node_id="b").status == Step.PENDING
    engine.resume_run(run, alice)
    run = engine.wait_for(run)
    assert run.status == Run.SUCCEEDED and run.steps.count() == 3


def test_retry_from_the_failed_step_reuses_what_succeeded(celery_worker, alice, fake_llm):
    workflow = slow_pipeline(alice, fake_llm, latency_ms=0)
    fake_llm.fail_next({}, {"status": 400, "message": "bad request for b"})
    run = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    assert run.status == Run.FAILED and "bad request for b" in run.error
    assert engine.can_retry(run)
    engine.retry_run(run, alice)
    run = engine.wait_for(run)
    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.get(node_id="a").attempt == 1  # not run again
    assert run.steps.get(node_id="b").epoch == 1
    assert fake_llm.request_count == 4


def test_fork_reuses_earlier_outputs_and_runs_from_the_step_with_edits(
    celery_worker, alice, fake_llm
):
    workflow = slow_pipeline(alice, fake_llm, latency_ms=0)
    source = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    calls_before = fake_llm.request_count
    step_b = source.steps.get(node_id="b")
    fork = engine.fork_run(
        step_b,
        alice,
        input={"topic": "y"},
        overrides={"b": {"prompt": "Rethink {topic}", "model": "openai/other-model"}},
    )
    fork = engine.wait_for(fork)
    assert fork.status == Run.SUCCEEDED, fork.error
    assert fork.parent == source and fork.forked_from_step == step_b
    reused = fork.steps.get(node_id="a")
    assert reused.reused_from == source.steps.get(node_id="a")
    assert fork.state["a"] == source.state["a"]
    assert fake_llm.request_count == calls_before + 2
    b_request = fake_llm.requests[calls_before]
    assert b_request["model"] == "other-model"
    assert "Rethink y" in b_request["messages"][-1]["content"]


def test_global_stop_switch_pauses_every_active_run(celery_worker, alice, fake_llm):
    workflow = slow_pipeline(alice, fake_llm, latency_ms=500)
    runs = [engine.start_run(workflow.latest_version(), {"topic": str(i)}, alice) for i in range(3)]
    wait_until(lambda: fake_llm.request_count >= 1)
    assert engine.set_stop_everything(True, alice) == 3
    assert all(Run.objects.get(pk=r.pk).status == Run.PAUSED for r in runs)
    late = engine.start_run(workflow.latest_version(), {"topic": "late"}, alice)
    assert late.status == Run.PAUSED
    with pytest.raises(engine.RunControlError):
        engine.resume_run(runs[0], alice)
    engine.set_stop_everything(False, alice)
    for run in [*runs, late]:
        engine.resume_run(run, alice)
    assert all(engine.wait_for(r).status == Run.SUCCEEDED for r in [*runs, late])


def test_controls_that_do_not_apply_are_refused(celery_worker, alice, fake_llm):
    workflow = slow_pipeline(alice, fake_llm, latency_ms=0)
    run = engine.wait_for(engine.start_run(workflow.latest_version(), {"topic": "x"}, alice))
    assert not (
        engine.can_cancel(run)
        or engine.can_pause(run)
        or engine.can_resume(run)
        or engine.can_retry(run)
    )
    for control in (engine.cancel_run, engine.pause_run, engine.resume_run, engine.retry_run):
        with pytest.raises(engine.RunControlError):
            control(run, alice)
