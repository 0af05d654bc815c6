"""In Chromium: upload a CrewAI project's agents.yaml + tasks.yaml, then run what was imported."""

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from runs import engine
from runs.models import Run
from teams.models import Workflow

pytestmark = [pytest.mark.browser, pytest.mark.integration]

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def page(live_server, alice, chromium):
    page = chromium.new_page(base_url=live_server.url)
    page.set_default_timeout(20_000)
    page.goto("/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/runs/$"))
    return page


def test_upload_a_crewai_pair_then_run_it_to_success(page, celery_worker, alice):
    crew = FIXTURES / "crewai_latest_ai"
    page.goto("/workflows/import/")
    page.set_input_files("#id_agents_file", str(crew / "agents.yaml"))
    page.set_input_files("#id_tasks_file", str(crew / "tasks.yaml"))
    page.fill("#id_name", "Latest AI")
    page.get_by_role("button", name="Import").click()

    # A clean import opens the new workflow in the editor.
    page.wait_for_url(re.compile(r"/workflows/latest-ai/edit/$"))
    workflow = Workflow.objects.get(slug="latest-ai")
    assert workflow.owner == alice and workflow.latest_version() is not None

    # Its inputs are the CrewAI placeholders: the start page asks for them.
    page.goto("/runs/new/?workflow=latest-ai")
    page.fill("#id_in-topic", "AI agents")
    page.fill("#id_in-current_year", "2025")
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url(re.compile(r"/runs/\d+/$"))

    run = Run.objects.get(pk=int(page.url.rstrip("/").rsplit("/", 1)[1]))
    assert run.input == {"topic": "AI agents", "current_year": "2025"}
    run = engine.wait_for(run, timeout_s=90)
    assert run.status == Run.SUCCEEDED, run.error
    page.reload()
    expect(page.get_by_test_id("run-status")).to_have_text("Succeeded")


def test_an_upload_with_unknown_tools_lists_them_and_links_to_the_workflow(page):
    crew = FIXTURES / "crewai_hierarchical"
    page.goto("/workflows/import/")
    page.set_input_files("#id_agents_file", str(crew / "agents.yaml"))
    page.set_input_files("#id_tasks_file", str(crew / "tasks.yaml"))
    page.check("#id_hierarchical")
    page.get_by_role("button", name="Import").click()

    result = page.locator("#import-result")
    expect(result).to_contain_text("unknown tool 'SerperDevTool'")
    expect(result).to_contain_text("unknown tool 'search_notes'")
    result.get_by_role("link", name="Open the workflow").click()
    page.wait_for_url(re.compile(r"/workflows/imported-crewai-crew/edit/$"))


def test_a_broken_upload_shows_the_error_on_the_form(page):
    bad = FIXTURES / "crewai_latest_ai" / "agents.yaml"
    page.goto("/workflows/import/")
    page.set_input_files("#id_file", str(bad))
    page.get_by_role("button", name="Import").click()

    expect(page.locator("#import-form [role=alert]")).to_contain_text("This is not a Baton export")
    assert not Workflow.objects.exists()
