"""API keys never leave the process: a run made with a key in the environment and credentials
in an agent's api_base shows neither in any page, event, stored row or log line.

The steps run in this process (engine.execute_step, as the Celery task does) so that caplog
sees every log line the engine, LiteLLM and the HTTP client write at the configured level. They
run inside the test's transaction, so nothing is queued: a Celery worker that an earlier test of
the session started would otherwise take the same steps and race this process for them.
"""

import json
import logging
import secrets

import pytest
from django.core import serializers
from django.test import Client

from approvals.models import ApprovalRequest
from runs import engine
from runs.models import Run, RunEvent, Step, ToolCall, UsageRecord
from tests.factories import make_agent, make_tool, make_workflow

pytestmark = pytest.mark.django_db

ENV_KEY = "sk-live-" + secrets.token_hex(20)
URL_TOKEN = "sk-proxy-" + secrets.token_hex(20)

SPEC = {
    "input_schema": {
        "type": "object",
        "properties": {"topic": {"type": "string"}},
        "required": ["topic"],
    },
    "nodes": [
        {"id": "solve", "kind": "agent", "agent": "keyed", "prompt": "Compute {topic}"},
        {"id": "check", "kind": "approval", "title": "Looks right?", "prompt": "{solve}"},
    ],
    "edges": [{"source": "solve", "target": "check"}],
}


@pytest.fixture
def keyed_workflow(alice, fake_llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    base = fake_llm.base_url.replace("http://", f"http://baton:{URL_TOKEN}@")
    calculator = make_tool("calculator")
    make_agent("keyed", model=fake_llm.model(), api_base=base, tools=[calculator])
    return make_workflow(SPEC, owner=alice, slug="keyed")


def run_inline(run: Run, limit: int = 20) -> Run:
    """Execute the run's pending steps here, one after another, until none is left."""
    for _ in range(limit):
        step = run.steps.filter(status=Step.PENDING).order_by("id").first()
        if step is None:
            break
        Step.objects.filter(pk=step.pk).update(not_before=None)
        engine.execute_step(step.pk)
    run.refresh_from_db()
    return run


def everything_stored(run: Run) -> str:
    rows = [
        run,
        *run.steps.all(),
        *RunEvent.objects.filter(run=run),
        *ToolCall.objects.filter(step__run=run),
        *UsageRecord.objects.filter(run=run),
        *ApprovalRequest.objects.filter(run=run),
    ]
    return serializers.serialize("json", rows)


def every_page(user, run: Run) -> str:
    client = Client()
    client.force_login(user)
    urls = [
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/events/",
        "/runs/",
        "/approvals/",
        "/costs/",
        f"/costs/runs/{run.pk}/breakdown/",
        "/workflows/",
        "/workflows/keyed/edit/",
        "/workflows/keyed/draft/",
        "/workflows/keyed/versions/",
        "/workflows/keyed/export/",
        f"/runs/editor/keyed/status/{run.pk}/",
        "/costs/?format=csv&table=by_model",
        "/costs/?format=csv&table=top_runs",
    ]
    urls += [
        f"/approvals/{pk}/"
        for pk in ApprovalRequest.objects.filter(run=run).values_list("pk", flat=True)
    ]
    pages = []
    for url in urls:
        response = client.get(url)
        # 286 is htmx's "stop polling": the events of a finished run.
        assert response.status_code in (200, 286), url
        pages.append(response.content.decode())
    return "\n".join(pages)


def assert_no_secret(text: str, where: str) -> None:
    for secret in (ENV_KEY, URL_TOKEN):
        assert secret not in text, f"{secret[:10]}… appears in {where}"


def test_keys_never_appear_in_pages_events_rows_or_logs(
    keyed_workflow, alice, admin_user, fake_llm, caplog
):
    caplog.set_level(logging.INFO)
    # A transient failure first, so an error and a retry are recorded too.
    fake_llm.fail_next({"status": 500, "message": "upstream hiccup"})
    run = engine.start_run(keyed_workflow.latest_version(), {"topic": "6*7"}, alice)

    run = run_inline(run)

    assert run.status == Run.WAITING_APPROVAL, run.error
    step = run.steps.get(node_id="solve")
    assert step.attempts and step.tool_calls, "the run exercised retries and a tool call"
    assert fake_llm.request_count >= 2
    assert_no_secret(everything_stored(run), "the stored run, steps, events and usage")
    assert_no_secret(json.dumps(step.input), "Step.input")
    assert_no_secret(every_page(alice, run), "alice's pages")
    assert_no_secret(every_page(admin_user, run), "staff pages")
    assert_no_secret(caplog.text, "the logs")


def test_a_provider_error_that_echoes_the_key_is_stored_without_it(
    keyed_workflow, alice, fake_llm, caplog
):
    """Some OpenAI-compatible servers and proxies quote the key they refused; Baton stores the
    provider's message as the step's error and shows it on the run page."""
    caplog.set_level(logging.INFO)
    fake_llm.fail_next({"status": 401, "message": f"Incorrect API key provided: {ENV_KEY}"})
    run = engine.start_run(keyed_workflow.latest_version(), {"topic": "6*7"}, alice)

    run = run_inline(run)

    assert run.status == Run.FAILED
    assert "Incorrect API key provided" in run.steps.get(node_id="solve").error
    assert_no_secret(everything_stored(run), "the stored run, steps and events")
    assert_no_secret(every_page(alice, run), "alice's pages")
    assert_no_secret(caplog.text, "the logs")
