"""`manage.py run_workflow`."""

import pytest
from django.core.management import call_command

from runs.models import Run
from tests.factories import make_agent, make_workflow, pipeline_spec


@pytest.fixture
def pipeline(db, alice):
    for name in ("a", "b"):
        make_agent(name)
    return make_workflow(pipeline_spec("a", "b"), owner=alice, slug="cli-pipe")


@pytest.mark.integration
def test_run_workflow_waits_prints_steps_and_totals(celery_worker, pipeline, capsys):
    call_command("run_workflow", "cli-pipe", input='{"topic": "cli"}', wait=True)
    out = capsys.readouterr().out
    run = Run.objects.get()
    assert f"run {run.pk} started: /runs/{run.pk}/" in out
    assert "  a#0 succeeded" in out and "  b#0 succeeded" in out
    assert f"run {run.pk} succeeded: {run.total_tokens} tokens" in out
    assert run.cost > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("cli-pipe", "--input", "{not json"), "--input is not valid JSON"),
        (("nope", "--input", "{}"), "no workflow with slug 'nope'"),
        (("cli-pipe", "--input", '{"topic": 3}'), "invalid input: topic: 3 is not of type"),
        (("cli-pipe", "--input", "[]"), "invalid input: The input must be a JSON object."),
    ],
)
def test_run_workflow_refuses_bad_input_with_exit_code_2(pipeline, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        call_command("run_workflow", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not Run.objects.exists()
