"""Model rules the rest of Baton relies on: immutable versions, unique numbers, append-only logs."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from runs.models import Run, RunEvent, Step
from teams.models import Workflow, WorkflowVersion
from teams.spec import SCHEMA_VERSION
from tests.factories import make_agent, make_tool, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def workflow(alice) -> Workflow:
    make_agent("researcher")
    make_agent("writer")
    return make_workflow(pipeline_spec("researcher", "writer"), owner=alice, slug="pipeline")


def make_run(workflow: Workflow) -> Run:
    return Run.objects.create(
        workflow=workflow, version=workflow.latest_version(), input={"topic": "tea"}
    )


def test_publishing_freezes_the_draft_as_numbered_versions(workflow, alice):
    first = workflow.latest_version()
    workflow.draft["nodes"][0]["prompt"] = "Dig into {topic}"
    workflow.save()

    second = workflow.publish(user=alice, note="sharper prompt")

    assert (first.number, second.number) == (1, 2)
    assert second.spec["nodes"][0]["prompt"] == "Dig into {topic}"
    assert first.spec["nodes"][0]["prompt"] == "Work on {topic}"
    assert second.created_by == alice
    assert second.note == "sharper prompt"
    assert second.schema_version == SCHEMA_VERSION
    assert workflow.latest_version() == second


def test_a_version_number_is_unique_per_workflow(workflow):
    version = workflow.latest_version()
    with pytest.raises(IntegrityError), transaction.atomic():
        WorkflowVersion.objects.create(workflow=workflow, number=version.number, spec=version.spec)


def test_two_workflows_each_have_their_own_version_1(workflow):
    other = make_workflow(pipeline_spec("writer"), slug="other")
    assert other.latest_version().number == 1
    assert workflow.latest_version().number == 1


def test_a_published_version_cannot_be_changed(workflow):
    version = workflow.latest_version()
    version.spec = {"nodes": []}
    version.note = "rewritten history"

    with pytest.raises(ValidationError, match="immutable"):
        version.save()

    version.refresh_from_db()
    assert version.spec["nodes"][0]["id"] == "researcher"
    assert version.note == "test"


def test_publish_refuses_an_invalid_draft_with_its_problems(workflow):
    workflow.draft = {
        "input_schema": {"type": "object"},
        "nodes": [{"id": "a", "kind": "magic"}, {"id": "j", "kind": "join"}],
        "edges": [{"source": "a", "target": "j"}],
    }

    with pytest.raises(ValidationError) as caught:
        workflow.publish()

    assert "node 'a': unknown node kind 'magic'" in caught.value.messages
    assert "node 'j': a join needs at least two inputs" in caught.value.messages
    assert workflow.versions.count() == 1


def test_publish_stores_an_old_format_draft_in_the_current_format(workflow):
    workflow.draft = {
        "schema_version": 1,
        "input_schema": {"type": "object"},
        "nodes": [
            {"id": "a", "type": "agent", "agent": "writer"},
            {"id": "b", "type": "agent", "agent": "researcher"},
        ],
        "edges": [{"from": "a", "to": "b"}],
    }
    version = workflow.publish()
    assert version.spec["nodes"][0]["kind"] == "agent"
    assert version.spec["edges"] == [{"source": "a", "target": "b"}]
    assert version.spec["schema_version"] == SCHEMA_VERSION


def test_saving_an_invalid_draft_is_refused_by_model_validation(workflow):
    workflow.draft = {"input_schema": {"type": "object"}, "nodes": [{"id": "a", "kind": "agent"}]}
    with pytest.raises(ValidationError) as caught:
        workflow.full_clean()
    assert caught.value.message_dict["draft"] == ["node 'a': missing agent (`agent`)"]


def test_a_tool_must_name_a_registered_entrypoint():
    tool = make_tool("shell")
    tool.entrypoint = "os.system"
    with pytest.raises(ValidationError) as caught:
        tool.full_clean()
    assert "entrypoint" in caught.value.message_dict


def test_a_step_is_unique_per_run_node_and_iteration(workflow):
    run = make_run(workflow)
    Step.objects.create(run=run, node_id="researcher", kind="agent", iteration=0)
    Step.objects.create(run=run, node_id="researcher", kind="agent", iteration=1)
    make_run(workflow).steps.create(node_id="researcher", kind="agent", iteration=0)

    with pytest.raises(IntegrityError), transaction.atomic():
        Step.objects.create(run=run, node_id="researcher", kind="agent", iteration=1)

    assert run.steps.count() == 2


def test_a_run_event_seq_is_unique_per_run(workflow):
    run = make_run(workflow)
    RunEvent.objects.create(run=run, seq=1, kind="run.created")
    make_run(workflow).events.create(seq=1, kind="run.created")

    with pytest.raises(IntegrityError), transaction.atomic():
        RunEvent.objects.create(run=run, seq=1, kind="run.status")


def test_run_events_are_append_only(workflow):
    event = RunEvent.objects.create(
        run=make_run(workflow), seq=1, kind="run.created", payload={"status": "queued"}
    )
    event.payload = {"status": "succeeded"}

    with pytest.raises(ValueError, match="append-only"):
        event.save()

    event.refresh_from_db()
    assert event.payload == {"status": "queued"}


def test_a_version_used_by_a_run_cannot_be_deleted(workflow):
    run = make_run(workflow)

    with pytest.raises(ProtectedError), transaction.atomic():
        run.version.delete()
    assert WorkflowVersion.objects.filter(pk=run.version_id).exists()


def test_users_see_only_workflows_they_own_or_belong_to(workflow, alice, bob, charlie, admin_user):
    workflow.members.add(bob)
    assert list(Workflow.objects.for_user(alice)) == [workflow]
    assert list(Workflow.objects.for_user(bob)) == [workflow]
    assert list(Workflow.objects.for_user(charlie)) == []
    assert list(Workflow.objects.for_user(admin_user)) == [workflow]
