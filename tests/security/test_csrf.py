"""CSRF: every state-changing request needs the token, on every route; GET never changes
anything (so a link or an <img> cannot act for a logged-in user)."""

import pytest
from django.db.models import Max
from django.test import Client

from approvals.models import ApprovalRequest
from runs.models import Run, RunEvent, Step, Switch, ToolCall
from teams.models import Agent, Role, Tool, Workflow, WorkflowVersion
from tests.security.test_scoping import app_routes, scoped_world, url_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return scoped_world(alice, bob)


UNSAFE = ("post", "put", "patch", "delete")


def all_routes() -> list:
    return [pytest.param(route, id=route.name) for route in app_routes()]


@pytest.mark.parametrize("route", all_routes())
def test_every_state_changing_request_without_the_token_is_refused(world, alice, route):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    url = url_for(route, world)
    for method in UNSAFE:
        response = getattr(client, method)(url, {"decision": "approve", "on": "1"})
        assert response.status_code == 403, f"{method.upper()} {url}: {response.status_code}"
        assert b"CSRF verification failed" in response.content, f"{method.upper()} {url}"


def test_with_the_token_the_same_request_goes_through(world, alice):
    """The refusals above are CSRF's, not something else's: with the token, alice's POST
    acts (here: cancel her run)."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    page = client.get(f"/runs/{world.run.pk}/")
    token = (
        page.cookies["csrftoken"].value
        if "csrftoken" in page.cookies
        else (client.cookies["csrftoken"].value)
    )
    response = client.post(f"/runs/{world.run.pk}/cancel/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    world.run.refresh_from_db()
    assert world.run.status == Run.CANCELLED


def test_the_login_form_needs_the_token_too(alice):
    client = Client(enforce_csrf_checks=True)
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 403
    assert "_auth_user_id" not in client.session


def _snapshot() -> dict:
    """Everything a view could change, summarised: row counts and latest changes."""
    models = (
        Workflow,
        WorkflowVersion,
        Run,
        Step,
        RunEvent,
        ToolCall,
        ApprovalRequest,
        Agent,
        Role,
        Tool,
        Switch,
    )
    state = {model.__name__: model.objects.count() for model in models}
    state["workflow_updated"] = Workflow.objects.aggregate(m=Max("updated_at"))["m"]
    state["run_updated"] = Run.objects.aggregate(m=Max("updated_at"))["m"]
    state["run_status"] = sorted(Run.objects.values_list("pk", "status"))
    state["approvals"] = sorted(ApprovalRequest.objects.values_list("pk", "status"))
    return state


@pytest.mark.parametrize("user", ["alice", "admin_user"])
def test_no_get_request_changes_anything(world, request, user):
    client = Client()
    client.force_login(request.getfixturevalue(user))
    before = _snapshot()
    for route in app_routes():
        if route.name == "logout":
            continue
        client.get(url_for(route, world), {"on": "1", "decision": "approve"})
    assert _snapshot() == before
