"""The admin is the configuration UI: every page loads, specs are validated, history is kept."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from runs.models import (
    LookupToken,
    ModelPrice,
    Run,
    RunEvent,
    Step,
    Switch,
    ToolCall,
    ToolHealth,
    UsageDaily,
    UsageRecord,
)
from teams.models import OutboxMessage, Tool, Workflow, WorkflowVersion

pytestmark = pytest.mark.django_db

READ_ONLY = {
    LookupToken,
    WorkflowVersion,
    RunEvent,
    UsageRecord,
    UsageDaily,
    OutboxMessage,
    Run,
    Step,
    ToolCall,
}


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def populated(admin_user) -> Run:
    """One row of every model, so changelists render real rows and every change page exists."""
    call_command("load_demo", stdout=open("/dev/null", "w"))
    workflow = Workflow.objects.get(slug="demo-approval")
    run = Run.objects.create(
        workflow=workflow,
        version=workflow.latest_version(),
        input={"topic": "<b>tea</b>"},
        started_by=admin_user,
        status=Run.SUCCEEDED,
        started_at=timezone.now(),
    )
    step = Step.objects.create(
        run=run, node_id="email", kind="tool", status=Step.SUCCEEDED, output={"sent": True}
    )
    ToolCall.objects.create(
        step=step,
        call_index=0,
        idempotency_key=f"{run.pk}:{step.pk}:0",
        tool="send_email",
        arguments={"to": "team@example.com"},
    )
    RunEvent.objects.create(run=run, seq=1, kind="run.created", payload={"status": "queued"})
    price = ModelPrice.objects.create(
        model="openai/gpt-4o-mini",
        input_per_1m=Decimal("0.15"),
        output_per_1m=Decimal("0.6"),
        effective_from=timezone.now() - timedelta(days=1),
    )
    UsageRecord.objects.create(
        run=run,
        step=step,
        workflow=workflow,
        model=price.model,
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        cost=Decimal("0.00001"),
        price=price,
        at=timezone.now(),
    )
    ToolHealth.objects.create(
        tool="send_email",
        consecutive_failures=5,
        open_until=timezone.now() + timedelta(minutes=1),
        last_error="boom",
    )
    Switch.objects.create(name="stop_everything")
    OutboxMessage.objects.create(idempotency_key="k1", tool="send_email", payload={"to": "x@y"})
    return run


def registered():
    return [
        pytest.param(model, id=f"{model._meta.app_label}.{model._meta.model_name}")
        for model in admin.site._registry
    ]


def admin_url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def test_every_baton_model_is_in_the_admin():
    from django.apps import apps

    for app in ("teams", "runs"):
        for model in apps.get_app_config(app).get_models():
            assert admin.site.is_registered(model), model


def test_admin_index_lists_the_configuration(staff_client, populated):
    response = staff_client.get("/admin/")
    assert response.status_code == 200
    for name in (b"Workflows", b"Agents", b"Tools", b"Roles", b"Runs", b"Model prices"):
        assert name in response.content


@pytest.mark.parametrize("model", registered())
def test_every_changelist_and_change_page_loads_for_a_superuser(staff_client, populated, model):
    response = staff_client.get(admin_url(model, "changelist"))
    assert response.status_code == 200

    obj = model._default_manager.first()
    if obj is not None:
        assert staff_client.get(admin_url(model, "change", obj.pk)).status_code == 200


@pytest.mark.parametrize("model", registered())
def test_every_add_page_loads_where_adding_is_allowed(staff_client, admin_user, rf, model):
    request = rf.get("/admin/")
    request.user = admin_user
    allowed = admin.site._registry[model].has_add_permission(request)
    assert allowed == (model not in READ_ONLY) or model._meta.app_label not in ("teams", "runs")

    response = staff_client.get(admin_url(model, "add"))

    assert response.status_code == (200 if allowed else 403)


@pytest.mark.parametrize("model", registered())
def test_changelist_search_works(staff_client, populated, model):
    if not admin.site._registry[model].search_fields:
        pytest.skip("no search on this model")
    response = staff_client.get(admin_url(model, "changelist"), {"q": "1"})
    assert response.status_code == 200


def workflow_form(**fields) -> dict:
    data = {
        "name": "Tea report",
        "slug": "tea-report",
        "description": "",
        "draft": json.dumps(
            {
                "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}}},
                "nodes": [{"id": "write", "kind": "agent", "agent": "writer", "prompt": "{topic}"}],
                "edges": [],
            }
        ),
        "layout": "{}",
        "max_steps_per_run": "200",
        "max_wall_s": "3600",
        "budget_policy": "stop",
        "versions-TOTAL_FORMS": "0",
        "versions-INITIAL_FORMS": "0",
        "versions-MIN_NUM_FORMS": "0",
        "versions-MAX_NUM_FORMS": "0",
    }
    return {**data, **fields}


def test_saving_a_valid_spec_in_the_admin_stores_it(staff_client, populated):
    response = staff_client.post(admin_url(Workflow, "add"), workflow_form())
    assert response.status_code == 302
    workflow = Workflow.objects.get(slug="tea-report")
    assert workflow.draft["nodes"][0]["agent"] == "writer"
    assert workflow.versions.count() == 0, "saving a draft publishes nothing"


def test_saving_an_invalid_spec_in_the_admin_shows_every_problem(staff_client, populated):
    draft = {
        "input_schema": {"type": "object"},
        "nodes": [
            {"id": "write", "kind": "agent", "agent": "ghostwriter"},
            {"id": "send", "kind": "tool", "tool": "telegraph"},
            {"id": "odd", "kind": "magic"},
            {"id": "gather", "kind": "join"},
        ],
        "edges": [{"source": "write", "target": "gather"}, {"source": "write", "target": "moon"}],
    }
    response = staff_client.post(admin_url(Workflow, "add"), workflow_form(draft=json.dumps(draft)))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["draft"]
    assert "node 'write': unknown agent 'ghostwriter'" in errors
    assert "node 'send': unknown tool 'telegraph'" in errors
    assert "node 'odd': unknown node kind 'magic'" in errors
    assert "node 'gather': a join needs at least two inputs" in errors
    assert "edge 2: target 'moon' is not a node" in errors
    assert len(errors) == len(set(errors)), "no problem is listed twice"
    assert b"unknown agent &#x27;ghostwriter&#x27;" in response.content
    assert not Workflow.objects.filter(slug="tea-report").exists()


def test_editing_a_workflow_keeps_the_saved_spec_when_the_new_one_is_invalid(
    staff_client, populated
):
    workflow = Workflow.objects.get(slug="demo-pipeline")
    before = workflow.draft
    draft = json.dumps({**before, "nodes": before["nodes"] + [{"id": "x", "kind": "magic"}]})
    response = staff_client.post(
        admin_url(Workflow, "change", workflow.pk),
        workflow_form(
            name=workflow.name,
            slug=workflow.slug,
            draft=draft,
            **{
                "versions-TOTAL_FORMS": "1",
                "versions-INITIAL_FORMS": "1",
                "versions-0-id": str(workflow.latest_version().pk),
                "versions-0-workflow": str(workflow.pk),
            },
        ),
    )
    assert response.status_code == 200
    assert (
        "node 'x': unknown node kind 'magic'" in response.context["adminform"].form.errors["draft"]
    )
    workflow.refresh_from_db()
    assert workflow.draft == before


def test_the_spec_is_shown_as_indented_json(staff_client, populated):
    workflow = Workflow.objects.get(slug="demo-pipeline")
    response = staff_client.get(admin_url(Workflow, "change", workflow.pk))
    # Indented, one key a line (PostgreSQL's jsonb may reorder the keys).
    assert b"{\n  &quot;" in response.content
    assert b"\n  &quot;schema_version&quot;: 2" in response.content


def test_a_pasted_old_format_spec_is_saved_in_the_current_format(staff_client, populated):
    old = {
        "schema_version": 1,
        "input_schema": {"type": "object"},
        "nodes": [{"id": "w", "type": "agent", "agent": "writer"}],
        "edges": [],
    }
    response = staff_client.post(admin_url(Workflow, "add"), workflow_form(draft=json.dumps(old)))
    assert response.status_code == 302
    assert Workflow.objects.get(slug="tea-report").draft["nodes"][0]["kind"] == "agent"


def test_invalid_json_is_refused(staff_client, populated):
    response = staff_client.post(admin_url(Workflow, "add"), workflow_form(draft="{nodes: ["))
    assert response.status_code == 200
    assert "Enter a valid JSON." in response.context["adminform"].form.errors["draft"]


def publish(client, *workflows):
    return client.post(
        admin_url(Workflow, "changelist"),
        {"action": "publish_draft", "_selected_action": [w.pk for w in workflows]},
        follow=True,
    )


def test_the_publish_action_publishes_a_changed_draft(staff_client, populated, admin_user):
    workflow = Workflow.objects.get(slug="demo-pipeline")
    workflow.draft["nodes"][0]["prompt"] = "Look harder at {topic}"
    workflow.save()

    response = publish(staff_client, workflow)

    version = workflow.latest_version()
    assert version.number == 2
    assert version.created_by == admin_user
    assert version.spec["nodes"][0]["prompt"] == "Look harder at {topic}"
    assert "published v2" in response.content.decode()


def test_the_publish_action_skips_an_unchanged_draft(staff_client, populated):
    workflow = Workflow.objects.get(slug="demo-fanout")
    response = publish(staff_client, workflow)
    assert workflow.versions.count() == 1
    assert "already published as v1" in response.content.decode()


def test_the_publish_action_refuses_an_invalid_draft_with_its_problems(staff_client, populated):
    workflow = Workflow.objects.get(slug="demo-pipeline")
    # Saved behind the admin's back (e.g. by a script), so never validated.
    Workflow.objects.filter(pk=workflow.pk).update(
        draft={
            **workflow.draft,
            "nodes": workflow.draft["nodes"] + [{"id": "late", "kind": "agent", "agent": "nobody"}],
        }
    )

    response = publish(staff_client, workflow)

    assert workflow.versions.count() == 1
    content = response.content.decode()
    assert "not published" in content
    assert "unknown agent &#x27;nobody&#x27;" in content
    assert "unreachable from the entry node" in content


def test_history_cannot_be_edited_or_deleted_in_the_admin(staff_client, populated):
    run = populated
    version = run.version
    event = run.events.get()
    for model, obj in (
        (WorkflowVersion, version),
        (RunEvent, event),
        (UsageRecord, run.usage.get()),
    ):
        page = staff_client.get(admin_url(model, "change", obj.pk))
        assert page.status_code == 200
        assert b'name="_save"' not in page.content
        assert staff_client.post(admin_url(model, "change", obj.pk), {}).status_code == 403
        assert (
            staff_client.post(admin_url(model, "delete", obj.pk), {"post": "yes"}).status_code
            == 403
        )
    assert RunEvent.objects.filter(pk=event.pk).exists()


def test_deleting_a_run_in_the_admin_deletes_what_it_recorded(staff_client, populated):
    run = populated
    response = staff_client.post(admin_url(Run, "delete", run.pk), {"post": "yes"})
    assert response.status_code == 302
    assert not Run.objects.filter(pk=run.pk).exists()
    assert not RunEvent.objects.exists()
    assert not Step.objects.exists()
    assert not UsageRecord.objects.exists()


def test_run_page_shows_its_steps_and_escapes_agent_data(staff_client, populated):
    response = staff_client.get(admin_url(Run, "change", populated.pk))
    content = response.content.decode()
    assert "email" in content  # the step inline
    assert "&lt;b&gt;tea&lt;/b&gt;" in content
    assert "<b>tea</b>" not in content


def test_closing_a_tool_circuit_forgets_its_failures(staff_client, populated):
    health = ToolHealth.objects.get()
    staff_client.post(
        admin_url(ToolHealth, "changelist"),
        {"action": "close_circuit", "_selected_action": [health.pk]},
    )
    health.refresh_from_db()
    assert (health.consecutive_failures, health.open_until, health.last_error) == (0, None, "")


def test_a_switch_records_who_changed_it(staff_client, admin_user, populated):
    switch = Switch.objects.get()
    response = staff_client.post(
        admin_url(Switch, "change", switch.pk), {"name": "stop_everything", "on": "on"}
    )
    assert response.status_code == 302
    switch.refresh_from_db()
    assert switch.on and switch.changed_by == admin_user


def test_a_tool_with_an_invalid_argument_schema_is_refused(staff_client):
    response = staff_client.post(
        admin_url(Tool, "add"),
        {
            "name": "calc",
            "description": "Adds",
            "entrypoint": "baton.calculator",
            "args_schema": json.dumps({"type": "banana"}),
        },
    )
    assert response.status_code == 200
    assert "Not a valid JSON schema" in str(response.context["adminform"].form.errors)


def test_a_non_staff_user_cannot_open_the_admin(client, alice):
    client.force_login(alice)
    response = client.get(admin_url(Workflow, "changelist"))
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
