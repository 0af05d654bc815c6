"""`load_demo` (run by every `make run`) creates the demo team once and never duplicates it."""

from decimal import Decimal
from io import StringIO

import jsonschema
import pytest
from django.core.management import call_command

from teams.models import Agent, Role, Tool, Workflow, WorkflowVersion
from teams.spec import validate_spec

pytestmark = pytest.mark.django_db

DEMO_SLUGS = ["demo-approval", "demo-fanout", "demo-pipeline"]


def load_demo(*args: str) -> str:
    out = StringIO()
    call_command("load_demo", *args, stdout=out)
    return out.getvalue()


def counts() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (Role, Tool, Agent, Workflow, WorkflowVersion)
    }


def known_names() -> dict[str, set[str]]:
    return {
        "known_agents": set(Agent.objects.values_list("name", flat=True)),
        "known_tools": set(Tool.objects.values_list("name", flat=True)),
        "known_workflows": set(Workflow.objects.values_list("slug", flat=True)),
    }


def test_loading_the_demo_twice_gives_the_same_rows():
    load_demo()
    first = counts()
    output = load_demo()

    assert counts() == first
    assert first == {"Role": 5, "Tool": 5, "Agent": 5, "Workflow": 3, "WorkflowVersion": 3}
    assert "0 workflow(s) created, 0 version(s) published" in output


def test_every_demo_workflow_has_a_published_valid_version_taking_a_topic():
    load_demo()

    assert sorted(Workflow.objects.values_list("slug", flat=True)) == DEMO_SLUGS
    for workflow in Workflow.objects.all():
        version = workflow.latest_version()
        assert version is not None, workflow.slug
        spec = version.get_spec()
        assert validate_spec(spec, **known_names()) == [], workflow.slug
        jsonschema.validate({"topic": "solar power"}, spec["input_schema"])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({}, spec["input_schema"])
        assert workflow.max_cost_per_run == Decimal("0.50")
        assert version.spec == workflow.draft


def test_demo_agents_run_offline_on_the_scripted_model():
    load_demo()
    assert set(Agent.objects.values_list("model", flat=True)) == {"scripted/baton"}
    researcher = Agent.objects.get(name="researcher")
    assert [tool.name for tool in researcher.tools.all()] == ["search_notes"]


def test_the_demo_workflows_have_the_promised_shapes():
    load_demo()
    spec = {w.slug: w.latest_version().get_spec() for w in Workflow.objects.all()}

    pipeline = spec["demo-pipeline"]
    assert [n["agent"] for n in pipeline["nodes"]] == ["researcher", "analyst", "writer"]
    assert "{research}" in pipeline["nodes"][1]["prompt"]

    fanout = {n["id"]: n for n in spec["demo-fanout"]["nodes"]}
    branches = [e["target"] for e in spec["demo-fanout"]["edges"] if e["source"] == "fan_out"]
    assert fanout["fan_out"]["kind"] == "parallel"
    assert len(branches) == 3
    assert all(fanout[b]["agent"] == "analyst" for b in branches)
    assert len({fanout[b]["prompt"] for b in branches}) == 3, "each analyst takes its own angle"
    assert fanout["gather"]["kind"] == "join"
    assert fanout["synthesis"]["agent"] == "synthesiser"

    approval = {n["id"]: n for n in spec["demo-approval"]["nodes"]}
    assert approval["email"]["tool"] == "send_email"
    assert approval["email"]["args"]["subject"] == "Report on {topic}"
    assert approval["email"]["args"]["body"] == "{draft}"
    send_email = Tool.objects.get(name="send_email")
    assert send_email.requires_approval and send_email.side_effect
    assert approval["publish"]["tool"] == "publish_report"


def test_demo_workflows_belong_to_the_first_superuser_once_there_is_one(
    admin_user, django_user_model
):
    django_user_model.objects.create_superuser("second", "second@example.com", "second-123")
    load_demo()
    assert set(Workflow.objects.values_list("owner__username", flat=True)) == {"admin"}


def test_demo_workflows_loaded_before_any_superuser_get_one_later(django_user_model):
    load_demo()
    assert set(Workflow.objects.values_list("owner", flat=True)) == {None}

    django_user_model.objects.create_superuser("admin", "admin@example.com", "admin-123")
    load_demo()

    assert set(Workflow.objects.values_list("owner__username", flat=True)) == {"admin"}


def test_reloading_keeps_what_a_user_changed():
    load_demo()
    researcher = Agent.objects.get(name="researcher")
    researcher.model = "openai/gpt-4o-mini"
    researcher.save()
    workflow = Workflow.objects.get(slug="demo-pipeline")
    workflow.draft["nodes"][0]["prompt"] = "My own prompt about {topic}"
    workflow.save()
    workflow.publish(note="mine")

    load_demo()

    assert Agent.objects.get(name="researcher").model == "openai/gpt-4o-mini"
    workflow.refresh_from_db()
    assert workflow.draft["nodes"][0]["prompt"] == "My own prompt about {topic}"
    assert workflow.latest_version().note == "mine"


def test_reset_restores_the_demo_and_publishes_only_what_changed():
    load_demo()
    researcher = Agent.objects.get(name="researcher")
    researcher.model = "openai/gpt-4o-mini"
    researcher.tools.clear()
    researcher.save()
    workflow = Workflow.objects.get(slug="demo-pipeline")
    workflow.draft["nodes"][0]["prompt"] = "My own prompt about {topic}"
    workflow.save()
    workflow.publish(note="mine")

    output = load_demo("--reset")

    researcher.refresh_from_db()
    assert researcher.model == "scripted/baton"
    assert [tool.name for tool in researcher.tools.all()] == ["search_notes"]
    workflow.refresh_from_db()
    assert workflow.versions.count() == 3
    assert workflow.latest_version().get_spec()["nodes"][0]["prompt"].startswith("Research")
    assert Workflow.objects.get(slug="demo-fanout").versions.count() == 1
    assert "1 version(s) published" in output
