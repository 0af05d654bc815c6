"""The templates gallery: every pattern creates a valid published workflow that runs as-is."""

import pytest
from django.core.exceptions import ValidationError

from approvals.decisions import decide_approval
from approvals.models import ApprovalRequest
from runs import engine
from runs.models import Run
from teams.gallery import TEMPLATES, create_from_template
from teams.models import Agent, Role, Workflow
from teams.spec import validate_spec

pytestmark = pytest.mark.django_db

KEYS = list(TEMPLATES)


def _known() -> dict:
    return {
        "known_agents": set(Agent.objects.values_list("name", flat=True)),
        "known_tools": set(),
        "known_workflows": set(Workflow.objects.values_list("slug", flat=True)),
    }


def test_the_gallery_has_every_pattern_the_issue_asks_for():
    assert KEYS == [
        "pipeline",
        "fanout",
        "router",
        "supervisor",
        "debate",
        "vote",
        "hierarchical",
        "approval",
    ]


@pytest.mark.parametrize("key", KEYS)
def test_each_template_creates_a_valid_published_workflow_with_its_agents(key, alice):
    workflow = create_from_template(key, name=f"My {key}", slug=f"my-{key}", owner=alice)

    version = workflow.latest_version()
    assert version is not None and version.created_by == alice
    assert validate_spec(version.get_spec(), **_known()) == []
    assert workflow.owner == alice and workflow.description == TEMPLATES[key].description
    assert set(workflow.layout) == {n["id"] for n in version.spec["nodes"]}
    assert version.layout == workflow.layout
    agents = Agent.objects.filter(name__startswith=f"my-{key}-")
    assert agents.exists()
    assert {a.model for a in agents} == {"scripted/baton"}


def test_each_template_uses_the_node_kind_it_is_named_for(alice):
    kinds = {}
    for key in KEYS:
        workflow = create_from_template(key, name=key, slug=key, owner=alice)
        kinds[key] = {n["kind"] for n in workflow.draft["nodes"]}
    assert kinds["pipeline"] == {"agent"}
    assert {"parallel", "join"} <= kinds["fanout"]
    assert "router" in kinds["router"]
    assert kinds["supervisor"] == {"supervisor"}
    assert kinds["debate"] == {"debate"}
    assert kinds["vote"] == {"vote"}
    assert "subworkflow" in kinds["hierarchical"]
    assert "approval" in kinds["approval"]


def test_the_hierarchical_template_creates_its_child_workflow_alongside(alice):
    parent = create_from_template("hierarchical", name="Org", slug="org", owner=alice)

    node = next(n for n in parent.draft["nodes"] if n["kind"] == "subworkflow")
    child = Workflow.objects.get(slug=node["workflow"])
    assert child.slug == "org-team"
    assert child.owner == alice
    assert child.latest_version() is not None
    assert node["input"] == {"topic": "{topic}", "brief": "{plan}"}


def test_using_a_template_twice_gives_new_agents_but_reuses_roles(alice):
    first = create_from_template("pipeline", name="One", slug="one", owner=alice)
    second = create_from_template("pipeline", name="Two", slug="two", owner=alice)

    first_agents = {n["agent"] for n in first.draft["nodes"]}
    second_agents = {n["agent"] for n in second.draft["nodes"]}
    assert first_agents.isdisjoint(second_agents)
    assert Role.objects.filter(name="Researcher").count() == 1


def test_an_agent_name_already_taken_gets_a_suffix(alice):
    create_from_template("pipeline", name="X", slug="x", owner=alice)
    Workflow.objects.filter(slug="x").update(slug="renamed")

    workflow = create_from_template("pipeline", name="X", slug="x", owner=alice)

    assert workflow.draft["nodes"][0]["agent"] == "x-researcher-2"


def test_a_taken_slug_is_refused_and_creates_nothing(alice):
    create_from_template("vote", name="V", slug="v", owner=alice)
    agents = Agent.objects.count()

    with pytest.raises(ValidationError, match="already exists"):
        create_from_template("vote", name="V", slug="v", owner=alice)
    assert Agent.objects.count() == agents


# --- pages ----------------------------------------------------------------------------------


def test_the_gallery_page_lists_every_template_with_a_use_button(client, bob):
    client.force_login(bob)

    response = client.get("/workflows/gallery/")

    page = response.content.decode()
    assert response.status_code == 200
    for template in TEMPLATES.values():
        assert template.title in page
        assert f'action="/workflows/gallery/{template.key}/"' in page
    assert page.count("Use this template") == len(TEMPLATES)


def test_the_gallery_requires_login(client):
    response = client.get("/workflows/gallery/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_use_this_template_creates_the_workflow_and_opens_the_editor(client, bob):
    client.force_login(bob)

    response = client.post(
        "/workflows/gallery/debate/", {"debate-name": "Team debate", "debate-slug": "team-debate"}
    )

    assert response.status_code == 302
    assert response["Location"] == "/workflows/team-debate/edit/"
    workflow = Workflow.objects.get(slug="team-debate")
    assert workflow.owner == bob and workflow.name == "Team debate"
    assert Workflow.objects.for_user(bob).filter(pk=workflow.pk).exists()


def test_a_blank_slug_is_made_from_the_name_and_kept_free(client, bob):
    client.force_login(bob)
    client.post("/workflows/gallery/vote/", {"vote-name": "Vote with a judge"})
    response = client.post("/workflows/gallery/vote/", {"vote-name": "Vote with a judge"})

    assert response["Location"] == "/workflows/vote-with-a-judge-2/edit/"


def test_a_taken_or_invalid_slug_shows_the_error_on_its_card(client, bob):
    client.force_login(bob)
    client.post("/workflows/gallery/vote/", {"vote-name": "V", "vote-slug": "taken"})

    taken = client.post("/workflows/gallery/router/", {"router-name": "R", "router-slug": "taken"})
    invalid = client.post(
        "/workflows/gallery/router/", {"router-name": "R", "router-slug": "not a slug"}
    )

    assert taken.status_code == 400
    assert "A workflow with the slug &#x27;taken&#x27; already exists." in taken.content.decode()
    assert invalid.status_code == 400
    assert Workflow.objects.count() == 1


def test_an_unknown_template_is_404_and_get_is_not_allowed(client, bob):
    client.force_login(bob)
    assert client.post("/workflows/gallery/nope/", {"nope-name": "x"}).status_code == 404
    assert client.get("/workflows/gallery/vote/").status_code == 405


# --- every template runs as-is on the scripted provider -------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("key", KEYS)
def test_each_template_runs_as_is_on_the_scripted_provider(celery_worker, alice, key):
    workflow = create_from_template(key, name=key, slug=f"run-{key}", owner=alice)

    run = engine.start_run(workflow.latest_version(), {"topic": "durable agents"}, alice)
    run = engine.wait_for(run, timeout_s=120)

    if key == "approval":
        assert run.status == Run.WAITING_APPROVAL, run.error
        assert ApprovalRequest.objects.filter(run=run, status="pending").count() == 1
    else:
        assert run.status == Run.SUCCEEDED, run.error
        assert run.result
    if key == "hierarchical":
        child = Run.objects.get(parent=run)
        assert child.status == Run.SUCCEEDED and child.workflow.slug == "run-hierarchical-team"


@pytest.mark.integration
def test_the_router_template_takes_the_rule_edge_when_the_input_matches(celery_worker, alice):
    workflow = create_from_template("router", name="R", slug="r", owner=alice)

    run = engine.start_run(workflow.latest_version(), {"topic": "queues", "depth": "deep"}, alice)
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert set(run.steps.values_list("node_id", flat=True)) == {"triage", "deep_dive"}


@pytest.mark.integration
@pytest.mark.parametrize(("approve", "last_node"), [(True, "finalise"), (False, "revise")])
def test_the_approval_template_continues_after_the_decision(
    celery_worker, alice, admin_user, approve, last_node
):
    workflow = create_from_template("approval", name="A", slug="a", owner=alice)
    run = engine.wait_for(
        engine.start_run(workflow.latest_version(), {"topic": "launch"}, alice), timeout_s=60
    )
    request = ApprovalRequest.objects.get(run=run)

    decide_approval(
        request.pk, admin_user, approve=approve, comment="" if approve else "Too vague."
    )
    run = engine.wait_for(run, timeout_s=60)

    assert run.status == Run.SUCCEEDED, run.error
    assert run.steps.filter(node_id=last_node, status="succeeded").exists()
