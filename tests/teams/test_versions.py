"""Publishing, the version list, readable diffs and rollback."""

import json

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from runs.models import Run
from teams.diff import diff_specs
from teams.models import WorkflowVersion
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def workflow(alice):
    make_agent("researcher", model="scripted/baton")
    make_agent("writer", model="openai/gpt-4o-mini")
    return make_workflow(
        pipeline_spec("researcher", "writer"), owner=alice, slug="report", publish=False
    )


@pytest.fixture
def client(alice) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def publish(client: Client, note: str = ""):
    return client.post(reverse("teams:publish", args=["report"]), {"note": note})


def save_draft(client: Client, spec: dict):
    response = client.put(
        reverse("teams:draft", args=["report"]),
        json.dumps({"spec": spec, "layout": {}}),
        content_type="application/json",
    )
    assert response.status_code == 200
    return response


def changed_spec() -> dict:
    """Version 2 of the report workflow: a changed prompt and agent, a new reviewer node, the
    old edge replaced, and one more input."""
    spec = pipeline_spec("researcher", "writer")
    spec["nodes"][0]["prompt"] = "Research {topic}\nList three sources."
    spec["nodes"][1]["agent"] = "researcher"
    spec["nodes"].append({"id": "review", "kind": "agent", "agent": "writer", "prompt": "Check"})
    spec["edges"] = [
        {"source": "researcher", "target": "review"},
        {"source": "review", "target": "writer", "label": "ok"},
    ]
    spec["input_schema"]["properties"]["audience"] = {"type": "string"}
    return spec


def test_publishing_an_invalid_draft_is_refused_with_its_problems(client, workflow):
    save_draft(
        client,
        {
            **workflow.draft,
            "nodes": [
                {"id": "a", "kind": "agent", "agent": "nobody"},
            ],
            "edges": [],
        },
    )
    response = publish(client, "broken")
    assert response.status_code == 400
    assert response.json()["problems"][0]["text"] == "node 'a': unknown agent 'nobody'"
    assert not workflow.versions.exists()


def test_publish_creates_a_version_with_its_note_and_author(client, alice, workflow):
    workflow.layout = {"researcher": {"x": 5, "y": 5}}
    workflow.save()
    response = publish(client, "first cut")
    assert response.status_code == 200 and response.json()["version"] == 1
    version = workflow.versions.get()
    assert (version.note, version.created_by) == ("first cut", alice)
    assert version.spec["nodes"] == workflow.draft["nodes"]
    assert version.layout == {"researcher": {"x": 5, "y": 5}}


def test_a_published_version_never_changes(client, workflow):
    publish(client, "v1")
    version = workflow.versions.get()
    save_draft(client, changed_spec())
    version.refresh_from_db()
    assert len(version.spec["nodes"]) == 2  # later draft edits leave it alone
    version.note = "rewritten"
    with pytest.raises(ValidationError):
        version.save()


def test_publishing_an_unchanged_draft_is_refused(client, workflow):
    publish(client, "v1")
    response = publish(client, "again")
    assert response.status_code == 409
    assert response.json()["error"] == "Nothing changed since version 1."
    assert workflow.versions.count() == 1


def test_versions_page_lists_number_note_author_time_and_runs(client, workflow):
    publish(client, "first cut")
    save_draft(client, changed_spec())
    publish(client, "add a reviewer")
    Run.objects.create(workflow=workflow, version=workflow.versions.get(number=1), input={})
    html = client.get(reverse("teams:versions", args=["report"])).content.decode()
    assert "first cut" in html and "add a reviewer" in html
    assert html.count("alice") >= 2
    assert "1 node added, 2 nodes changed, 2 edges added, 1 edge removed, 1 input change" in html
    v1 = html[html.index('id="version-1"') :]
    assert '<td class="num">1</td>' in v1[: v1.index("</tr>")]  # the run pinned to version 1
    assert "/workflows/report/versions/1/rollback/" in html


def test_diff_groups_node_edge_and_input_changes_with_before_and_after():
    before = pipeline_spec("researcher", "writer")
    diff = diff_specs(
        before,
        changed_spec(),
        agent_models={"researcher": "scripted/baton", "writer": "openai/gpt-4o-mini"},
    )
    assert [n["id"] for n in diff.nodes_added] == ["review"]
    assert diff.nodes_removed == []
    changes = {c.id: {f.field: f for f in c.fields} for c in diff.nodes_changed}
    prompt = changes["researcher"]["prompt"]
    assert ("-", "Work on {topic}") in prompt.lines
    assert ("+", "List three sources.") in prompt.lines
    agent = changes["writer"]["agent"]
    assert agent.before_text == "writer (openai/gpt-4o-mini)"
    assert agent.after_text == "researcher (scripted/baton)"
    assert [(e["source"], e["target"]) for e in diff.edges_added] == [
        ("researcher", "review"),
        ("review", "writer"),
    ]
    assert [(e["source"], e["target"]) for e in diff.edges_removed] == [("researcher", "writer")]
    assert [(c.field, c.added) for c in diff.input_schema] == [("audience", True)]
    assert diff_specs(before, before).is_empty


def test_diff_shows_an_edge_whose_condition_changed_field_by_field():
    before = pipeline_spec("a", "b")
    after = pipeline_spec("a", "b")
    after["edges"][0]["condition"] = {"path": "score", "op": "gt", "value": 3}
    diff = diff_specs(before, after)
    assert diff.edges_added == [] and diff.edges_removed == []
    (change,) = diff.edges_changed
    assert (change.source, change.target) == ("a", "b")
    assert change.fields[0].after_text == "score gt 3"


def test_diff_page_between_two_versions_is_readable(client, workflow):
    publish(client, "v1")
    save_draft(client, changed_spec())
    publish(client, "v2")
    page = client.get(reverse("teams:diff", args=["report"]), {"a": 1, "b": 2})
    html = page.content.decode()
    assert page.status_code == 200
    assert "Version 1 → Version 2" in html
    assert "+ review" in html
    assert '<span class="ins">+ List three sources.</span>' in html
    assert "writer (openai/gpt-4o-mini)" in html and "researcher (scripted/baton)" in html
    assert "− researcher → writer" in html
    assert 'id="diff-input"' in html and '<div class="name">audience</div>' in html


def test_diff_against_the_draft(client, workflow):
    publish(client, "v1")
    save_draft(client, changed_spec())
    html = client.get(
        reverse("teams:diff", args=["report"]), {"a": 1, "b": "draft"}
    ).content.decode()
    assert "Version 1 → Draft" in html and "+ review" in html


def test_diff_of_an_unknown_version_is_404(client, workflow):
    publish(client, "v1")
    assert client.get(reverse("teams:diff", args=["report"]), {"a": 9}).status_code == 404
    assert client.get(reverse("teams:diff", args=["report"]), {"a": "x"}).status_code == 404


def test_rollback_publishes_the_old_spec_as_a_new_version_and_makes_it_the_draft(
    client, alice, workflow
):
    workflow.layout = {"researcher": {"x": 1, "y": 1}}
    workflow.save()
    publish(client, "v1")
    save_draft(client, changed_spec())
    publish(client, "v2")
    response = client.post(reverse("teams:rollback", args=["report", 1]))
    assert response.status_code == 302
    latest = workflow.latest_version()
    assert latest.number == 3 and latest.note == "Rollback to version 1"
    assert latest.created_by == alice
    assert latest.spec == workflow.versions.get(number=1).spec
    assert latest.layout == {"researcher": {"x": 1, "y": 1}}
    workflow.refresh_from_db()
    assert workflow.draft == latest.spec  # the next publish does not undo the rollback
    assert publish(client, "nothing new").status_code == 409


def test_runs_stay_pinned_to_their_version_across_publish_and_rollback(client, workflow):
    publish(client, "v1")
    save_draft(client, changed_spec())
    publish(client, "v2")
    run = Run.objects.create(workflow=workflow, version=workflow.latest_version(), input={})
    client.post(reverse("teams:rollback", args=["report", 1]))
    run.refresh_from_db()
    assert run.version.number == 2
    assert len(run.version.get_spec()["nodes"]) == 3


def test_rolling_back_to_what_already_runs_publishes_nothing(client, workflow):
    publish(client, "v1")
    response = client.post(reverse("teams:rollback", args=["report", 1]), follow=True)
    assert "already what the latest version runs" in response.content.decode()
    assert WorkflowVersion.objects.count() == 1


def test_rollback_needs_post(client, workflow):
    publish(client, "v1")
    assert client.get(reverse("teams:rollback", args=["report", 1])).status_code == 405
