"""The run pages: list, detail, start form, controls, polling fallback, and who sees what."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from runs import engine, events
from runs.fragments import layout_graph
from runs.models import Run, Step, ToolCall
from runs.views import PAGE_SIZE
from tests.factories import make_agent, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db

FANOUT = {
    "input_schema": {
        "type": "object",
        "properties": {"topic": {"type": "string"}},
        "required": ["topic"],
    },
    "nodes": [
        {"id": "fan", "kind": "parallel", "label": "Fan out"},
        {"id": "a", "kind": "agent", "agent": "analyst", "prompt": "A {topic}"},
        {"id": "b", "kind": "agent", "agent": "analyst", "prompt": "B {topic}"},
        {"id": "join", "kind": "join"},
        {"id": "sum", "kind": "agent", "agent": "analyst", "prompt": "Sum {a} {b}"},
    ],
    "edges": [
        {"source": "fan", "target": "a"},
        {"source": "fan", "target": "b"},
        {"source": "a", "target": "join"},
        {"source": "b", "target": "join"},
        {"source": "join", "target": "sum"},
    ],
}


def make_run(workflow, user=None, status=Run.RUNNING, **fields) -> Run:
    """A run row as the engine leaves it, without executing anything."""
    version = workflow.latest_version()
    fields.setdefault("input", {"topic": "otters"})
    return Run.objects.create(
        workflow=workflow,
        version=version,
        started_by=user,
        status=status,
        started_at=fields.pop("started_at", timezone.now()),
        **fields,
    )


def login(client: Client, user) -> Client:
    client.force_login(user)
    return client


@pytest.fixture
def workflow(alice, bob):
    make_agent("analyst")
    return make_workflow(FANOUT, owner=alice, members=[bob], slug="fanout", name="Fan-out team")


@pytest.fixture
def other_workflow(charlie):
    make_agent("scribe")
    return make_workflow(
        pipeline_spec("scribe"), owner=charlie, slug="charlies", name="Charlie's own"
    )


# --- access ------------------------------------------------------------------------------


def test_outsider_gets_404_on_every_page_of_a_run(client, workflow, alice, charlie):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent")
    login(client, charlie)
    assert client.get(f"/runs/{run.pk}/").status_code == 404
    assert client.get(f"/runs/{run.pk}/events/?after=0").status_code == 404
    assert client.get(f"/runs/{run.pk}/steps/{step.pk}/fork/").status_code == 404
    for action in ("cancel", "pause", "resume", "retry"):
        assert client.post(f"/runs/{run.pk}/{action}/").status_code == 404
    run.refresh_from_db()
    assert run.status == Run.RUNNING


def test_member_and_staff_open_the_run_page(client, workflow, alice, bob, admin_user):
    run = make_run(workflow, alice)
    assert login(client, bob).get(f"/runs/{run.pk}/").status_code == 200
    assert login(Client(), admin_user).get(f"/runs/{run.pk}/").status_code == 200


def test_run_list_shows_only_runs_the_user_may_see(
    client, workflow, other_workflow, alice, charlie
):
    mine = make_run(workflow, alice)
    theirs = make_run(other_workflow, charlie)
    page = login(client, alice).get("/runs/").content.decode()
    assert f'id="run-row-{mine.pk}"' in page
    assert f'id="run-row-{theirs.pk}"' not in page


# --- the list ----------------------------------------------------------------------------


def _row_ids(response) -> list[int]:
    return [int(pk) for pk in re.findall(r'id="run-row-(\d+)"', response.content.decode())]


def test_run_list_shows_status_workflow_version_user_tokens_and_cost(client, workflow, alice):
    start = timezone.now()
    run = make_run(
        workflow,
        alice,
        status=Run.SUCCEEDED,
        total_tokens=1234,
        cost=Decimal("0.0421"),
        started_at=start,
        finished_at=start + timedelta(seconds=75),
    )
    page = login(client, alice).get("/runs/").content.decode()
    row = re.search(rf'<tr id="run-row-{run.pk}".*?</tr>', page, re.S).group(0)
    for text in ("Succeeded", "Fan-out team", "v1", "alice", "1234", "$0.0421", "1m 15s"):
        assert text in row


def test_run_list_filters_by_status_workflow_dates_and_search(
    client, workflow, alice, bob, admin_user
):
    make_agent("writer")
    second = make_workflow(pipeline_spec("writer"), owner=alice, slug="writers", name="Writers")
    failed = make_run(workflow, alice, status=Run.FAILED)
    running = make_run(workflow, bob)
    other = make_run(second, alice, status=Run.FAILED)
    old = make_run(second, bob, status=Run.SUCCEEDED)
    Run.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=10))
    login(client, alice)

    assert set(_row_ids(client.get("/runs/?status=failed"))) == {failed.pk, other.pk}
    assert set(_row_ids(client.get("/runs/?workflow=writers"))) == {other.pk, old.pk}
    week_ago = (timezone.now() - timedelta(days=7)).date().isoformat()
    assert old.pk not in _row_ids(client.get(f"/runs/?started_from={week_ago}"))
    assert _row_ids(client.get(f"/runs/?started_to={week_ago}")) == [old.pk]
    assert set(_row_ids(client.get("/runs/?q=bob"))) == {running.pk, old.pk}
    assert set(_row_ids(client.get("/runs/?q=writ"))) == {other.pk, old.pk}
    assert _row_ids(client.get(f"/runs/?q=%23{failed.pk}")) == [failed.pk]
    assert set(_row_ids(client.get("/runs/?status=failed&workflow=fanout"))) == {failed.pk}


def test_run_list_workflow_filter_offers_only_visible_workflows(
    client, workflow, other_workflow, alice
):
    page = login(client, alice).get("/runs/").content.decode()
    assert "Fan-out team" in page
    assert "Charlie&#x27;s own" not in page
    assert login(Client(), alice).get("/runs/?workflow=charlies").status_code == 200


def test_run_list_pages_through_every_run_once_without_counting(client, workflow, alice):
    now = timezone.now()
    runs = [make_run(workflow, alice) for _ in range(2 * PAGE_SIZE + 5)]
    # Some runs share a creation time: the cursor must still not skip or repeat them.
    Run.objects.filter(pk__in=[r.pk for r in runs[:10]]).update(created_at=now)
    expected = list(Run.objects.order_by("-created_at", "-id").values_list("pk", flat=True))
    login(client, alice)

    seen, url, pages = [], "/runs/", []
    while url:
        with CaptureQueriesContext(connection) as queries:
            response = client.get(url)
        run_queries = [
            q["sql"].upper()
            for q in queries.captured_queries
            if "runs_run" in q["sql"] and "approvals_" not in q["sql"]  # the nav's badge
        ]
        assert run_queries and not any("COUNT(" in sql for sql in run_queries)
        pages.append(response)
        seen += _row_ids(response)
        url = response.context["older_url"]
    assert seen == expected
    assert len(pages) == 3

    newer = client.get(pages[2].context["newer_url"])
    assert _row_ids(newer) == _row_ids(pages[1])
    newest = client.get(pages[1].context["newer_url"])
    assert _row_ids(newest) == _row_ids(pages[0])


def test_run_list_first_page_takes_new_runs_and_later_pages_do_not(client, workflow, alice):
    for _ in range(PAGE_SIZE + 1):
        make_run(workflow, alice)
    login(client, alice)
    first = client.get("/runs/?status=running")
    assert 'ws-connect="/ws/runs/?status=running"' in first.content.decode()
    later = client.get(first.context["older_url"])
    assert "inserts=0" in later.content.decode()


def test_run_list_filter_request_from_htmx_gets_only_the_results(client, workflow, alice):
    make_run(workflow, alice)
    response = login(client, alice).get("/runs/?status=running", headers={"HX-Request": "true"})
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="results"')
    assert "<html" not in body


# --- the detail page ---------------------------------------------------------------------


@pytest.fixture
def finished_run(workflow, alice):
    run = make_run(
        workflow,
        alice,
        status=Run.SUCCEEDED,
        result="## Summary\n\nOtters **win**.",
        state={"topic": "otters", "a": {"angle": "market"}},
        total_tokens=90,
        cost=Decimal("0.0031"),
        finished_at=timezone.now(),
    )
    for node_id in ("fan", "a", "b", "join", "sum"):
        Step.objects.create(run=run, node_id=node_id, kind="agent", status=Step.SUCCEEDED)
    a = run.steps.get(node_id="a")
    a.input = {
        "messages": [
            {"role": "system", "content": "You are an analyst."},
            {"role": "user", "content": "A otters <b>now</b>"},
        ]
    }
    a.output = {"angle": "market", "score": 3}
    a.output_text = "Plain **markdown** <script>alert('x')</script>"
    a.tool_calls = [
        {
            "tool": "calculator",
            "arguments": {"expression": "2+2"},
            "result": {"value": 4},
            "status": "succeeded",
            "error": "",
        }
    ]
    a.attempts = [
        {
            "attempt": 1,
            "error_kind": "transient",
            "error": "rate limited",
            "at": "2025-01-01T00:00:00Z",
        }
    ]
    a.prompt_tokens, a.completion_tokens, a.total_tokens = 40, 20, 60
    a.cost, a.latency_ms, a.model = Decimal("0.002"), 1530, "scripted/baton"
    a.save()
    b = run.steps.get(node_id="b")
    b.status, b.error_kind, b.error = Step.FAILED, "permanent", "bad request <x>"
    b.save()
    return run


def test_run_page_shows_header_graph_steps_result_input_and_state(client, finished_run, alice):
    page = login(client, alice).get(f"/runs/{finished_run.pk}/").content.decode()
    header = re.search(r'<section id="run-header".*?</section>', page, re.S).group(0)
    assert "Succeeded" in header and "90" in header and "$0.0031" in header
    # Every node of the pinned version, coloured by its latest step.
    assert re.search(r'id="gnode-a" class="gnode gnode-succeeded"', page)
    assert re.search(r'id="gnode-b" class="gnode gnode-failed"', page)
    assert page.count('class="gnode-slot"') == 5
    step = finished_run.steps.get(node_id="a")
    body = re.search(rf'<div id="step-{step.pk}-body".*?Fork from this step', page, re.S).group(0)
    assert "You are an analyst." in body
    assert "A otters &lt;b&gt;now&lt;/b&gt;" in body
    assert "&quot;angle&quot;: &quot;market&quot;" in body  # JSON, pretty-printed
    assert "<strong>markdown</strong>" in body
    assert "<script>" not in body
    assert "calculator" in body and "&quot;expression&quot;: &quot;2+2&quot;" in body
    assert "rate limited" in body and "transient" in body
    assert "40 in · 20 out" in body and "1.5s" in body and "$0.002000" in body
    assert "bad request &lt;x&gt;" in page
    assert "<h2>Summary</h2>" in page and "<strong>win</strong>" in page
    assert 'data-testid="run-input"' in page and "&quot;topic&quot;: &quot;otters&quot;" in page
    assert '<pre id="run-state"' in page
    assert f'data-seq="{finished_run.last_seq}"' in page
    assert f'ws-connect="/ws/runs/{finished_run.pk}/"' in page


def test_run_page_shows_the_cost_breakdown_per_step_and_agent(client, finished_run, alice):
    from django.utils import timezone

    from runs.models import UsageRecord

    step = finished_run.steps.get(node_id="a")
    UsageRecord.objects.create(
        run=finished_run,
        step=step,
        workflow=finished_run.workflow,
        agent=step.agent,
        model="scripted/baton",
        prompt_tokens=40,
        completion_tokens=20,
        total_tokens=60,
        cost=Decimal("0.00123456"),
        at=timezone.now(),
    )
    page = login(client, alice).get(f"/runs/{finished_run.pk}/").content.decode()
    breakdown = re.search(r'<section class="card cost-breakdown".*?</section>', page, re.S)
    assert breakdown is not None
    assert 'id="run-cost-steps"' in breakdown.group(0)
    assert 'id="run-cost-agents"' in breakdown.group(0)
    assert "scripted/baton" in breakdown.group(0)


def test_untrusted_names_are_escaped_in_the_graph(client, alice):
    make_agent("analyst")
    spec = {
        "input_schema": {"type": "object", "properties": {}},
        "nodes": [
            {
                "id": "x<y>",
                "kind": "agent",
                "agent": "analyst",
                "prompt": "p",
                "label": "<img src=x onerror=alert(1)>",
            }
        ],
        "edges": [],
    }
    run = make_run(make_workflow(spec, owner=alice, slug="evil"), alice)
    page = login(client, alice).get(f"/runs/{run.pk}/").content.decode()
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert 'id="gnode-x_3c_y_3e_"' in page


def test_layout_puts_parallel_branches_side_by_side_and_honours_saved_positions():
    graph = layout_graph(FANOUT)
    nodes = {n.id: n for n in graph.nodes}
    assert nodes["a"].y == nodes["b"].y and nodes["a"].x != nodes["b"].x
    assert nodes["fan"].y < nodes["a"].y < nodes["join"].y < nodes["sum"].y
    saved = {n["id"]: {"x": 100 * i, "y": 0} for i, n in enumerate(FANOUT["nodes"])}
    placed = {n.id: n for n in layout_graph(FANOUT, saved).nodes}
    assert [placed[n["id"]].x for n in FANOUT["nodes"]] == [20, 120, 220, 320, 420]


def test_layout_draws_a_loop_as_a_back_edge():
    spec = {
        "nodes": [{"id": "draft", "kind": "agent"}, {"id": "review", "kind": "agent"}],
        "edges": [
            {"source": "draft", "target": "review"},
            {"source": "review", "target": "draft", "max_iterations": 3, "on": "failure"},
        ],
    }
    graph = layout_graph(spec)
    assert [e["back"] for e in graph.edges] == [False, True]
    assert graph.edges[1]["label"] == "on failure ≤3×"


def test_running_step_has_a_stream_target_and_running_node(client, workflow, alice):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent", status=Step.RUNNING)
    Step.objects.create(run=run, node_id="b", kind="agent", status=Step.RUNNING)
    page = login(client, alice).get(f"/runs/{run.pk}/").content.decode()
    assert f'<pre id="stream-{step.pk}" class="stream" hx-preserve="true">' in page
    assert 'class="gnode gnode-running"' in page
    assert "data-ticking" in page
    assert re.search(r"waiting for</span> LLM: a, b<", page)


def test_header_names_what_blocks_the_run(client, workflow, alice):
    login(client, alice)
    waiting = make_run(workflow, alice, status=Run.WAITING_APPROVAL, blocked_on="approval: email")
    page = client.get(f"/runs/{waiting.pk}/").content.decode()
    assert re.search(r"waiting for</span> approval: email<", page)
    paused = make_run(workflow, alice, status=Run.PAUSED, blocked_on="paused")
    page = client.get(f"/runs/{paused.pk}/").content.decode()
    assert re.search(r"waiting for</span> someone to resume it<", page)


# --- controls ----------------------------------------------------------------------------


def _buttons(page: str) -> dict[str, bool]:
    """Control name -> enabled."""
    return {
        m[1]: "disabled" not in m[2] for m in re.finditer(r'<button id="ctl-(\w+)"([^>]*)>', page)
    }


def test_controls_are_enabled_only_when_they_apply(client, workflow, alice):
    login(client, alice)
    running = make_run(workflow, alice)
    assert _buttons(client.get(f"/runs/{running.pk}/").content.decode()) == {
        "pause": True,
        "resume": False,
        "retry": False,
        "cancel": True,
    }
    paused = make_run(workflow, alice, status=Run.PAUSED)
    assert _buttons(client.get(f"/runs/{paused.pk}/").content.decode()) == {
        "pause": False,
        "resume": True,
        "retry": False,
        "cancel": True,
    }
    failed = make_run(workflow, alice, status=Run.FAILED, finished_at=timezone.now())
    Step.objects.create(run=failed, node_id="a", kind="agent", status=Step.FAILED)
    assert _buttons(client.get(f"/runs/{failed.pk}/").content.decode()) == {
        "pause": False,
        "resume": False,
        "retry": True,
        "cancel": False,
    }


def test_controls_are_post_only_and_need_the_csrf_token(workflow, alice):
    run = make_run(workflow, alice)
    client = login(Client(enforce_csrf_checks=True), alice)
    assert client.get(f"/runs/{run.pk}/cancel/").status_code == 405
    assert client.post(f"/runs/{run.pk}/cancel/").status_code == 403
    run.refresh_from_db()
    assert run.status == Run.RUNNING
    page = client.get(f"/runs/{run.pk}/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[1]
    response = client.post(f"/runs/{run.pk}/cancel/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response.url == f"/runs/{run.pk}/"
    run.refresh_from_db()
    assert run.status == Run.CANCELLED


def test_pause_and_resume_through_the_page(client, workflow, alice):
    run = make_run(workflow, alice)
    login(client, alice)
    client.post(f"/runs/{run.pk}/pause/")
    run.refresh_from_db()
    assert run.status == Run.PAUSED
    client.post(f"/runs/{run.pk}/resume/")
    run.refresh_from_db()
    assert run.status == Run.RUNNING


def test_a_control_that_does_not_apply_says_why(client, workflow, alice):
    run = make_run(workflow, alice, status=Run.SUCCEEDED, finished_at=timezone.now())
    response = login(client, alice).post(f"/runs/{run.pk}/cancel/", follow=True)
    assert "cannot be cancelled" in response.content.decode()


def test_htmx_control_answers_with_a_client_redirect(client, workflow, alice):
    run = make_run(workflow, alice)
    response = login(client, alice).post(f"/runs/{run.pk}/pause/", headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"/runs/{run.pk}/"


def test_only_staff_may_flip_the_global_stop_switch(client, workflow, alice, admin_user):
    run = make_run(workflow, alice)
    assert login(client, alice).post("/runs/stop-everything/", {"on": "1"}).status_code == 403
    assert not engine.stop_everything_on()
    assert 'data-testid="stop-switch"' not in client.get("/runs/").content.decode()

    staff = login(Client(), admin_user)
    assert 'data-testid="stop-switch"' in staff.get(f"/runs/{run.pk}/").content.decode()
    response = staff.post("/runs/stop-everything/", {"on": "1", "next": f"/runs/{run.pk}/"})
    assert response.url == f"/runs/{run.pk}/"
    assert engine.stop_everything_on()
    run.refresh_from_db()
    assert run.status == Run.PAUSED
    page = staff.get("/runs/").content.decode()
    assert "Release the global stop" in page and "Everything is stopped" in page
    staff.post("/runs/stop-everything/", {"on": "0", "next": "https://evil.example/"})
    assert not engine.stop_everything_on()


def test_fork_form_starts_a_new_run_with_the_edited_prompt(client, finished_run, alice):
    step = finished_run.steps.get(node_id="sum")
    login(client, alice)
    form = client.get(f"/runs/{finished_run.pk}/steps/{step.pk}/fork/")
    assert "Sum {a} {b}" in form.content.decode()
    response = client.post(
        f"/runs/{finished_run.pk}/steps/{step.pk}/fork/",
        {
            "input": '{"topic": "otters"}',
            "prompt": "Summarise {a} and {b} briefly",
            "model": form.context["form"].initial["model"],
        },
    )
    fork = Run.objects.get(forked_from_step=step)
    assert response.url == f"/runs/{fork.pk}/"
    assert fork.overrides == {"sum": {"prompt": "Summarise {a} and {b} briefly"}}
    assert fork.input == {"topic": "otters"}


def test_fork_form_shows_input_errors_inline(client, finished_run, alice):
    step = finished_run.steps.get(node_id="sum")
    response = login(client, alice).post(
        f"/runs/{finished_run.pk}/steps/{step.pk}/fork/", {"input": '{"other": 1}'}
    )
    assert response.status_code == 200
    assert "&#x27;topic&#x27; is a required property" in response.content.decode()
    assert not Run.objects.filter(forked_from_step=step).exists()


# --- polling fallback --------------------------------------------------------------------


def test_polling_returns_missed_events_and_stops_when_the_run_is_over(client, workflow, alice):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent")
    for kind in ("run.created", "step.created", "step.started"):
        events.append_event(run.pk, kind, {"step_id": step.pk, "node_id": "a"})
    login(client, alice)

    response = client.get(f"/runs/{run.pk}/events/?after=1")
    body = response.content.decode()
    assert response.status_code == 200
    assert re.findall(r'id="ev-(\d+)"', body) == ["2", "3"]
    assert 'data-seq="3"' in body and 'hx-swap-oob="beforeend:#steps"' in body

    Run.objects.filter(pk=run.pk).update(status=Run.SUCCEEDED, finished_at=timezone.now())
    events.append_event(run.pk, "run.status", {"status": "succeeded"})
    assert client.get(f"/runs/{run.pk}/events/?after=3").status_code == 286
    assert client.get(f"/runs/{run.pk}/events/?after=0").status_code == 286
    assert client.get(f"/runs/{run.pk}/events/?after=nonsense").status_code == 286


def test_cancelling_updates_the_steps_the_engine_cancels_without_events(client, workflow, alice):
    run = make_run(workflow, alice)
    waiting = Step.objects.create(run=run, node_id="a", kind="agent", status=Step.RUNNING)
    done = Step.objects.create(run=run, node_id="b", kind="agent", status=Step.SUCCEEDED)
    before = run.last_seq
    engine.cancel_run(run, alice)
    body = login(client, alice).get(f"/runs/{run.pk}/events/?after={before}").content.decode()
    head = re.search(rf'<div id="step-{waiting.pk}-head".*?</div>\s*</div>', body, re.S)[0]
    assert "Cancelled" in head and "stream-" not in head
    assert 'id="gnode-a" class="gnode gnode-cancelled"' in body
    assert f'id="step-{done.pk}-head"' not in body
    assert re.search(r'<button id="ctl-cancel"[^>]*disabled[^>]*hx-swap-oob="true"', body)


def test_polling_keeps_going_while_the_run_is_active(client, workflow, alice):
    run = make_run(workflow, alice)
    events.append_event(run.pk, "run.created", {})
    response = login(client, alice).get(f"/runs/{run.pk}/events/?after=1")
    assert response.status_code == 200 and response.content == b""


# --- starting a run ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "pattern": "^[a-z ]+$", "description": "What to study"},
        "notes": {"type": "string", "maxLength": 2000},
        "depth": {"type": "integer", "minimum": 1, "maximum": 5, "default": 2},
        "ratio": {"type": "number"},
        "urgent": {"type": "boolean"},
        "tone": {"type": "string", "enum": ["dry", "warm"]},
    },
    "required": ["topic", "tone"],
}


@pytest.fixture
def schema_workflow(alice):
    make_agent("writer")
    spec = {**pipeline_spec("writer"), "input_schema": SCHEMA}
    return make_workflow(spec, owner=alice, slug="schema-wf", name="Schema")


def test_start_form_is_generated_from_the_input_schema(client, schema_workflow, alice):
    page = login(client, alice).get("/runs/new/?workflow=schema-wf").content.decode()
    assert re.search(r'<input type="text" name="in-topic"[^>]*required', page)
    assert re.search(r'<textarea name="in-notes"[^>]*maxlength="2000"', page)
    assert re.search(r'<input type="number" name="in-depth" value="2"[^>]*max="5"', page)
    assert re.search(r'<input type="number" name="in-ratio"', page)
    assert re.search(r'<input type="checkbox" name="in-urgent"', page)
    assert re.search(r'<select name="in-tone"[^>]*required', page)
    assert "What to study" in page


def test_start_form_shows_validation_errors_inline(client, schema_workflow, alice):
    url = "/runs/new/?workflow=schema-wf"
    login(client, alice)
    response = client.post(url, {"in-depth": "9", "in-tone": "dry"})
    page = response.content.decode()
    assert response.status_code == 200
    assert page.count('class="field-error"') == 2  # topic required, depth too large
    # The engine validates against the JSON schema; its message lands on the field.
    response = client.post(url, {"in-topic": "UPPER", "in-tone": "dry", "in-depth": "2"})
    error = re.search(
        r'name="in-topic".*?<p class="field-error">([^<]*)</p>', response.content.decode(), re.S
    )
    assert "does not match" in error[1]
    assert not Run.objects.exists()


def test_start_form_starts_the_run_and_redirects_to_it(client, schema_workflow, alice):
    response = login(client, alice).post(
        "/runs/new/?workflow=schema-wf",
        {"in-topic": "sea otters", "in-tone": "warm", "in-depth": "3", "in-urgent": "on"},
    )
    run = Run.objects.get()
    assert response.url == f"/runs/{run.pk}/"
    assert run.input == {"topic": "sea otters", "tone": "warm", "depth": 3, "urgent": True}
    assert run.version == schema_workflow.latest_version()
    assert run.started_by == alice


def test_start_form_runs_a_chosen_older_version(client, schema_workflow, alice):
    schema_workflow.publish(user=alice, note="second")
    login(client, alice)
    page = client.get("/runs/new/?workflow=schema-wf").content.decode()
    assert '<option value="2" selected>v2 (latest) — second</option>' in page
    client.post("/runs/new/?workflow=schema-wf&version=1", {"in-topic": "otters", "in-tone": "dry"})
    assert Run.objects.get().version.number == 1


def test_start_page_lists_only_visible_workflows(client, schema_workflow, other_workflow, bob):
    login(client, bob)
    page = client.get("/runs/new/").content.decode()
    assert "Schema" not in page and "Charlie" not in page
    assert client.get("/runs/new/?workflow=schema-wf").status_code == 404
    response = client.post("/runs/new/?workflow=schema-wf", {"in-topic": "x", "in-tone": "dry"})
    assert response.status_code == 404
    assert not Run.objects.exists()


def test_tool_calls_of_a_running_step_show_from_their_records(client, workflow, alice):
    run = make_run(workflow, alice)
    step = Step.objects.create(run=run, node_id="a", kind="agent", status=Step.RUNNING)
    ToolCall.objects.create(
        step=step,
        call_index=0,
        idempotency_key=f"{run.pk}:{step.pk}:0",
        tool="word_count",
        arguments={"text": "a b c"},
        status=ToolCall.SUCCEEDED,
        result={"words": 3},
    )
    page = login(client, alice).get(f"/runs/{run.pk}/").content.decode()
    assert "word_count" in page and "&quot;words&quot;: 3" in page
