"""The workflow editor's pages and endpoints: list, create, draft autosave, side panel, run."""

import json
import re

import pytest
from django.test import Client
from django.urls import reverse

from runs.models import Run, Step
from teams.models import Agent, Role, Workflow
from tests.factories import make_agent, make_tool, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def agents():
    return [make_agent("researcher"), make_agent("writer")]


@pytest.fixture
def workflow(alice, bob, agents):
    return make_workflow(
        pipeline_spec("researcher", "writer"),
        owner=alice,
        members=[bob],
        slug="report",
        publish=False,
    )


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def put_draft(client: Client, slug: str, body: dict, **extra):
    return client.put(
        reverse("teams:draft", args=[slug]),
        json.dumps(body),
        content_type="application/json",
        **extra,
    )


def triggered(response, event: str):
    """The detail of an htmx event the response triggers, or None."""
    header = response.headers.get("HX-Trigger") or response.headers.get("HX-Trigger-After-Swap")
    return json.loads(header).get(event) if header else None


# --- list and create ------------------------------------------------------------------------


def test_workflow_list_shows_only_the_workflows_a_user_may_see(alice, charlie, workflow):
    make_workflow(pipeline_spec("researcher"), owner=charlie, slug="charlies", name="Charlie's")
    page = client_for(alice).get(reverse("teams:list"))
    assert page.status_code == 200
    assert b"/workflows/report/edit/" in page.content
    assert b"Charlie&#x27;s" not in page.content and b"charlies" not in page.content


def test_create_makes_an_empty_draft_owned_by_its_creator_and_opens_the_editor(alice):
    response = client_for(alice).post(
        reverse("teams:create"), {"name": "Weekly digest", "slug": "", "description": "x"}
    )
    workflow = Workflow.objects.get(slug="weekly-digest")
    assert response.status_code == 302
    assert response["Location"] == "/workflows/weekly-digest/edit/"
    assert workflow.owner == alice
    assert workflow.draft["nodes"] == [] and workflow.versions.count() == 0


def test_create_refuses_a_taken_slug(alice, workflow):
    response = client_for(alice).post(reverse("teams:create"), {"name": "Other", "slug": "report"})
    assert response.status_code == 200
    assert "is taken" in response.content.decode()
    assert Workflow.objects.filter(slug="report").count() == 1


def test_editor_page_embeds_the_draft_its_layout_and_its_problems(alice, workflow):
    workflow.layout = {"researcher": {"x": 10, "y": 20}}
    workflow.save()
    page = client_for(alice).get(reverse("teams:editor", args=["report"]))
    assert page.status_code == 200
    html = page.content.decode()
    script = re.search(r'<script id="editor-config" type="application/json">(.*?)</script>', html)
    config = json.loads(script.group(1))
    assert [n["id"] for n in config["spec"]["nodes"]] == ["researcher", "writer"]
    assert config["layout"] == {"researcher": {"x": 10, "y": 20}}
    assert config["problems"] == [] and config["latest_version"] is None
    assert config["urls"]["draft"] == "/workflows/report/draft/"
    assert 'type="module" src="/static/js/editor/main.js"' in html
    # Every kind of node is in the palette.
    for kind in (
        "agent",
        "tool",
        "router",
        "parallel",
        "join",
        "supervisor",
        "vote",
        "debate",
        "subworkflow",
        "approval",
    ):
        assert f'data-kind="{kind}"' in html


def test_a_member_can_open_and_save_the_draft(bob, workflow):
    client = client_for(bob)
    assert client.get(reverse("teams:editor", args=["report"])).status_code == 200
    response = put_draft(client, "report", {"spec": workflow.draft, "layout": {}})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "method,name,extra",
    [
        ("get", "editor", ()),
        ("get", "draft", ()),
        ("put", "draft", ()),
        ("post", "publish", ()),
        ("post", "panel_open", ()),
        ("post", "panel_apply", ()),
        ("post", "agent_create", ()),
        ("get", "versions", ()),
        ("get", "diff", ()),
        ("post", "rollback", (1,)),
        ("get", "runs:editor_run", ()),
        ("post", "runs:editor_run", ()),
        ("get", "runs:editor_run_status", (1,)),
    ],
)
def test_an_outsider_gets_404_everywhere(charlie, workflow, method, name, extra):
    workflow.publish(note="v1")
    url = reverse(name if ":" in name else f"teams:{name}", args=["report", *extra])
    response = getattr(client_for(charlie), method)(url)
    assert response.status_code == 404


def test_anonymous_users_are_sent_to_login(workflow):
    response = Client().get(reverse("teams:editor", args=["report"]))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


# --- draft ----------------------------------------------------------------------------------


def test_saving_an_invalid_draft_is_allowed_and_returns_its_problems(alice, workflow):
    spec = dict(workflow.draft)
    spec["nodes"] = [
        *spec["nodes"],
        {"id": "route", "kind": "router"},
        {"id": "ghost", "kind": "agent", "agent": "nobody"},
    ]
    spec["edges"] = [*spec["edges"], {"source": "writer", "target": "route"}]
    response = put_draft(client_for(alice), "report", {"spec": spec, "layout": {}})
    assert response.status_code == 200
    problems = response.json()["problems"]
    by_node = {(p["node"], p["message"]) for p in problems}
    assert ("ghost", "unknown agent 'nobody'") in by_node
    assert ("route", "a router needs a default edge") in by_node
    assert ("ghost", "unreachable from the entry node") in by_node
    workflow.refresh_from_db()
    assert [n["id"] for n in workflow.draft["nodes"]][-1] == "ghost"


def test_layout_is_stored_apart_from_the_spec(alice, workflow):
    spec = workflow.draft
    layout = {
        "researcher": {"x": 1.234, "y": 2},
        "writer": {"x": 300, "y": 2},
        "deleted_node": {"x": 0, "y": 0},
    }
    response = put_draft(client_for(alice), "report", {"spec": spec, "layout": layout})
    assert response.status_code == 200
    workflow.refresh_from_db()
    assert workflow.layout == {"researcher": {"x": 1.2, "y": 2}, "writer": {"x": 300, "y": 2}}
    assert "x" not in json.dumps(workflow.draft["nodes"])  # positions never enter the spec
    assert response.json()["differs_from_latest"] is True


def test_a_stale_revision_is_refused_so_no_one_overwrites_unseen_work(alice, bob, workflow):
    revision = client_for(alice).get(reverse("teams:draft", args=["report"])).json()["revision"]
    first = put_draft(
        client_for(bob), "report", {"spec": workflow.draft, "layout": {}, "revision": revision}
    )
    assert first.status_code == 200
    second = put_draft(
        client_for(alice),
        "report",
        {"spec": pipeline_spec("researcher"), "layout": {}, "revision": revision},
    )
    assert second.status_code == 409
    assert "changed elsewhere" in second.json()["error"]
    workflow.refresh_from_db()
    assert len(workflow.draft["nodes"]) == 2
    # Saving on top of the new revision works.
    third = put_draft(
        client_for(alice),
        "report",
        {
            "spec": pipeline_spec("researcher"),
            "layout": {},
            "revision": first.json()["revision"],
        },
    )
    assert third.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"spec": [1]}',
        '{"spec": {"nodes": [{"id": "a"}]}, "layout": {"a": 1}}',
        '{"spec": {}, "revision": "yesterday"}',
    ],
)
def test_a_malformed_draft_is_rejected_with_400(alice, workflow, body):
    response = client_for(alice).put(
        reverse("teams:draft", args=["report"]), body, content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]


def test_changes_need_the_csrf_token(alice, workflow):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    page = client.get(reverse("teams:editor", args=["report"]))
    token = page.cookies["csrftoken"].value
    body = {"spec": workflow.draft, "layout": {}}
    assert put_draft(client, "report", body).status_code == 403
    assert client.post(reverse("teams:publish", args=["report"])).status_code == 403
    assert client.post(reverse("teams:panel_open", args=["report"])).status_code == 403
    assert put_draft(client, "report", body, HTTP_X_CSRFTOKEN=token).status_code == 200
    response = client.post(
        reverse("teams:publish", args=["report"]), {"note": "n"}, HTTP_X_CSRFTOKEN=token
    )
    assert response.status_code == 200


# --- side panel -----------------------------------------------------------------------------


def panel_post(client, name: str, data: dict):
    data = {k: json.dumps(v) if k in ("element", "spec") else v for k, v in data.items()}
    return client.post(reverse(f"teams:{name}", args=["report"]), data)


def test_node_panel_offers_agents_and_the_state_variables_the_prompt_may_use(alice, workflow):
    spec = workflow.draft
    writer = spec["nodes"][1]
    response = panel_post(
        client_for(alice), "panel_open", {"target": "node", "element": writer, "spec": spec}
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert '<option value="writer" selected>writer</option>' in html
    assert 'data-insert="{topic}"' in html  # a run input
    assert 'data-insert="{researcher}"' in html  # the upstream node's output
    assert 'data-insert="{writer}"' not in html  # not its own output
    assert "scripted/baton" in html  # the agent card: model, retries, timeout
    assert "Create a new agent" in html


def test_an_edit_in_the_panel_comes_back_as_the_nodes_new_json(alice, workflow):
    node = {**workflow.draft["nodes"][0], "custom": "kept"}
    response = panel_post(
        client_for(alice),
        "panel_apply",
        {
            "target": "node",
            "key": "node:researcher",
            "element": node,
            "spec": workflow.draft,
            "id": "research",
            "label": "Research",
            "agent": "writer",
            "prompt": "Dig into {topic}",
            "output_schema": '{"type": "object"}',
            "escalate": "on",
        },
    )
    assert response.status_code == 200
    assert response.headers["HX-Reswap"] == "none"
    event = triggered(response, "baton:element-changed")
    assert event["key"] == "node:researcher"
    assert event["element"] == {
        "id": "research",
        "kind": "agent",
        "label": "Research",
        "agent": "writer",
        "prompt": "Dig into {topic}",
        "output_schema": {"type": "object"},
        "custom": "kept",
    }


def test_a_panel_edit_with_bad_json_shows_the_error_and_changes_nothing(alice, workflow):
    node = workflow.draft["nodes"][0]
    response = panel_post(
        client_for(alice),
        "panel_apply",
        {
            "target": "node",
            "element": node,
            "spec": workflow.draft,
            "id": "researcher",
            "agent": "researcher",
            "output_schema": "{not json",
        },
    )
    html = response.content.decode()
    assert triggered(response, "baton:element-changed") is None
    assert 'id="err-output_schema" hx-swap-oob="true">Not valid JSON' in html


def test_renaming_a_node_to_a_taken_id_is_refused(alice, workflow):
    node = workflow.draft["nodes"][0]
    response = panel_post(
        client_for(alice),
        "panel_apply",
        {
            "target": "node",
            "element": node,
            "spec": workflow.draft,
            "id": "writer",
            "agent": "researcher",
        },
    )
    assert triggered(response, "baton:element-changed") is None
    assert "Another node already has this id." in response.content.decode()


@pytest.mark.parametrize(
    "kind,fields,expected",
    [
        (
            "approval",
            {"title": "Ship it?", "due_in_s": "60", "default_outcome": "approve"},
            {"title": "Ship it?", "due_in_s": 60, "default_outcome": "approve"},
        ),
        (
            "vote",
            {"agents": ["researcher", "writer"], "judge": "writer", "mode": "pick"},
            {"agents": ["researcher", "writer"], "judge": "writer"},
        ),
        (
            "tool",
            {"tool": "calculator", "args": '{"expression": "{n} * 2"}'},
            {"tool": "calculator", "args": {"expression": "{n} * 2"}},
        ),
        ("join", {"on_branch_failure": "continue"}, {"on_branch_failure": "continue"}),
        (
            "subworkflow",
            {"workflow": "child", "version": "2", "input": '{"topic": "{topic}"}'},
            {"workflow": "child", "version": 2, "input": {"topic": "{topic}"}},
        ),
    ],
)
def test_each_kind_edits_the_keys_the_spec_documents(alice, workflow, kind, fields, expected):
    make_tool("calculator")
    make_workflow(pipeline_spec("researcher"), owner=alice, slug="child")
    node = {"id": "n1", "kind": kind}
    response = panel_post(
        client_for(alice),
        "panel_apply",
        {
            "target": "node",
            "element": node,
            "spec": workflow.draft,
            "id": "n1",
            **fields,
        },
    )
    event = triggered(response, "baton:element-changed")
    assert event is not None, response.content.decode()
    assert event["element"] == {"id": "n1", "kind": kind, **expected}


def test_edge_panel_sets_condition_default_label_and_loop_bound(alice, workflow):
    edge = workflow.draft["edges"][0]
    response = panel_post(
        client_for(alice),
        "panel_apply",
        {
            "target": "edge",
            "key": "edge:e1",
            "element": edge,
            "spec": workflow.draft,
            "on": "success",
            "label": "good enough",
            "default": "on",
            "condition_path": "review.score",
            "condition_op": "gte",
            "condition_value": "3",
            "max_iterations": "2",
        },
    )
    event = triggered(response, "baton:element-changed")
    assert event["element"] == {
        "source": "researcher",
        "target": "writer",
        "label": "good enough",
        "default": True,
        "condition": {"path": "review.score", "op": "gte", "value": 3},
        "max_iterations": 2,
    }
    # Opening the panel again shows the value so that saving keeps it a number, and a string
    # that looks like a number stays a string.
    opened = panel_post(
        client_for(alice),
        "panel_open",
        {
            "target": "edge",
            "element": {**edge, "condition": {"path": "a", "value": "3"}},
            "spec": workflow.draft,
        },
    ).content.decode()
    assert 'value="&quot;3&quot;"' in opened


def test_workflow_settings_change_the_input_schema_and_entry(alice, workflow):
    schema = {
        "type": "object",
        "properties": {"topic": {"type": "string"}, "words": {"type": "integer"}},
    }
    response = panel_post(
        client_for(alice),
        "panel_apply",
        {
            "target": "workflow",
            "key": "workflow:",
            "spec": workflow.draft,
            "input_schema": json.dumps(schema),
            "entry": "writer",
        },
    )
    element = triggered(response, "baton:element-changed")["element"]
    assert element["input_schema"] == schema and element["entry"] == "writer"
    assert "nodes" not in element


def test_an_agent_created_in_the_panel_is_used_by_the_node(alice, workflow):
    tool = make_tool("calculator")
    node = {"id": "critic", "kind": "agent"}
    response = panel_post(
        client_for(alice),
        "agent_create",
        {
            "key": "node:critic",
            "element": node,
            "spec": workflow.draft,
            "new_agent-name": "critic",
            "new_agent-role_name": "Critic",
            "new_agent-goal": "Find the weak spots",
            "new_agent-backstory": "",
            "new_agent-model": "scripted/baton",
            "new_agent-tools": [tool.pk],
            "new_agent-max_retries": "2",
            "new_agent-timeout_s": "30",
        },
    )
    agent = Agent.objects.get(name="critic")
    assert agent.role == Role.objects.get(name="Critic") and agent.max_retries == 2
    assert list(agent.tools.all()) == [tool]
    assert triggered(response, "baton:element-changed")["element"]["agent"] == "critic"
    assert '<option value="critic" selected>critic</option>' in response.content.decode()


def test_an_invalid_inline_agent_is_not_created_and_the_errors_show(alice, workflow):
    response = panel_post(
        client_for(alice),
        "agent_create",
        {
            "element": {"id": "x", "kind": "agent"},
            "spec": workflow.draft,
            "new_agent-name": "researcher",
            "new_agent-role_name": "R",
            "new_agent-goal": "",
            "new_agent-model": "scripted/baton",
            "new_agent-max_retries": "1",
            "new_agent-timeout_s": "5",
        },
    )
    html = response.content.decode()
    assert "Agent with this Name already exists." in html
    assert triggered(response, "baton:element-changed") is None
    assert Agent.objects.count() == 2


# --- run from the editor --------------------------------------------------------------------


def test_run_form_has_a_field_per_input_property(alice, workflow):
    html = client_for(alice).get(reverse("runs:editor_run", args=["report"])).content.decode()
    assert 'name="input-topic"' in html
    assert '<option value="draft" selected>The draft</option>' in html


def test_running_the_draft_publishes_a_test_version_only_when_it_changed(alice, workflow):
    client = client_for(alice)
    url = reverse("runs:editor_run", args=["report"])
    first = client.post(url, {"version": "draft", "input-topic": "bees"})
    assert first.status_code == 200
    run = Run.objects.get()
    assert run.version.number == 1 and run.version.note == "test run"
    assert run.input == {"topic": "bees"}
    started = triggered(first, "baton:run-started")
    assert started["run_id"] == run.pk
    assert started["status_url"] == f"/runs/editor/report/status/{run.pk}/"
    assert f'data-run-card="{run.pk}"' in first.content.decode()
    client.post(url, {"version": "draft", "input-topic": "ants"})
    assert workflow.versions.count() == 1  # unchanged draft: the same version runs again
    assert Run.objects.filter(version__number=1).count() == 2


def test_running_an_invalid_draft_is_refused_with_its_problems(alice, workflow):
    workflow.draft = {
        **workflow.draft,
        "nodes": [{"id": "a", "kind": "agent", "agent": "nobody"}],
        "edges": [],
    }
    workflow.save()
    response = client_for(alice).post(
        reverse("runs:editor_run", args=["report"]), {"version": "draft", "input-topic": "x"}
    )
    assert "unknown agent" in response.content.decode()
    assert not Run.objects.exists() and workflow.versions.count() == 0


def test_a_missing_required_input_is_reported_and_nothing_runs(alice, workflow):
    response = client_for(alice).post(
        reverse("runs:editor_run", args=["report"]), {"version": "draft", "input-topic": ""}
    )
    assert 'id="err-input-topic">This field is required.' in response.content.decode()
    assert not Run.objects.exists()


def test_run_status_reports_each_nodes_latest_step(alice, workflow):
    version = workflow.publish(note="v1")
    run = Run.objects.create(
        workflow=workflow, version=version, input={}, status=Run.RUNNING, started_by=alice
    )
    Step.objects.create(run=run, node_id="researcher", kind="agent", status=Step.SUCCEEDED)
    Step.objects.create(
        run=run, node_id="writer", kind="agent", status=Step.FAILED, iteration=0, error="boom"
    )
    Step.objects.create(run=run, node_id="writer", kind="agent", status=Step.RUNNING, iteration=1)
    data = client_for(alice).get(reverse("runs:editor_run_status", args=["report", run.pk])).json()
    assert data["run"]["status"] == "running" and data["run"]["active"] is True
    assert data["nodes"]["researcher"]["status"] == "succeeded"
    assert data["nodes"]["writer"] == {"status": "running", "iteration": 1, "error": ""}


def test_run_status_of_another_workflows_run_is_404(alice, workflow):
    other = make_workflow(pipeline_spec("researcher"), owner=alice, slug="other")
    run = Run.objects.create(workflow=other, version=other.latest_version(), input={})
    response = client_for(alice).get(reverse("runs:editor_run_status", args=["report", run.pk]))
    assert response.status_code == 404
