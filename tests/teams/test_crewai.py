"""CrewAI import: agents.yaml + tasks.yaml (+ a crew spec) become roles, agents and a workflow."""

import shutil
from pathlib import Path

import pytest
import yaml
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from runs import engine
from runs.models import Run
from teams.crewai import import_crewai, import_crewai_documents, litellm_model
from teams.models import Agent, Role, Workflow
from teams.spec import validate_spec
from teams.yaml_io import ImportFailed
from tests.factories import make_agent, make_tool

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures"
LATEST_AI = FIXTURES / "crewai_latest_ai"
HIERARCHICAL = FIXTURES / "crewai_hierarchical"


def _read(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def _import_latest_ai(**kwargs):
    return import_crewai(_read(LATEST_AI, "agents.yaml"), _read(LATEST_AI, "tasks.yaml"), **kwargs)


def _dump(data: dict) -> str:
    # Task order matters (it is the pipeline's order): keep it as written.
    return yaml.safe_dump(data, sort_keys=False)


def _known() -> dict:
    return {
        "known_agents": set(Agent.objects.values_list("name", flat=True)),
        "known_tools": set(),
        "known_workflows": set(Workflow.objects.values_list("slug", flat=True)),
    }


def test_a_sequential_crew_becomes_a_pipeline_in_task_order(alice):
    result = _import_latest_ai(owner=alice, name="Latest AI")

    assert result.problems == []
    spec = result.workflow.draft
    assert [n["id"] for n in spec["nodes"]] == ["research_task", "reporting_task"]
    assert [n["agent"] for n in spec["nodes"]] == ["researcher", "reporting_analyst"]
    assert spec["edges"] == [{"source": "research_task", "target": "reporting_task"}]
    report = spec["nodes"][1]["prompt"]
    assert report.index("Review the context you got") < report.index(
        "## research_task\n{research_task}"
    )
    assert report.rstrip().endswith("Formatted as markdown without '```'")
    assert "expected criteria for your final answer: A fully fledged report" in report
    assert validate_spec(spec, **_known()) == []
    assert result.version is not None and result.version.spec == spec
    assert result.workflow.owner == alice
    assert result.workflow.slug == "latest-ai"
    assert set(result.workflow.layout) == {"research_task", "reporting_task"}


def test_placeholders_become_required_string_inputs(alice):
    spec = _import_latest_ai(owner=alice).workflow.draft

    assert spec["input_schema"] == {
        "type": "object",
        "properties": {"topic": {"type": "string"}, "current_year": {"type": "string"}},
        "required": ["topic", "current_year"],
    }
    research = spec["nodes"][0]["prompt"]
    assert "Conduct a thorough research about {topic}" in research
    assert "the current year is {current_year}." in research


def test_roles_agents_and_the_role_text_with_placeholders(alice):
    _import_latest_ai(owner=alice)

    researcher = Agent.objects.get(name="researcher")
    assert researcher.model == "scripted/baton"
    assert researcher.role.name == "{topic} Senior Data Researcher"
    assert researcher.role.goal == "Uncover cutting-edge developments in {topic}"
    assert researcher.role.backstory.startswith("You're a seasoned researcher")
    # Baton's system prompt shows a role as written; the task prompt restates it so the run
    # fills in the topic.
    prompt = Workflow.objects.get().draft["nodes"][0]["prompt"]
    assert prompt.startswith(
        "For this task you are: {topic} Senior Data Researcher.\n"
        "Your goal: Uncover cutting-edge developments in {topic}"
    )


def test_a_task_without_context_sees_the_previous_task(alice):
    agents = {"writer": {"role": "Writer", "goal": "Write about {subject}"}}
    tasks = {
        "outline": {
            "description": "Outline {subject}.",
            "expected_output": "An outline",
            "agent": "writer",
        },
        "draft": {"description": "Draft it.", "agent": "writer"},
        "polish": {"description": "Polish it.", "agent": "writer", "context": ["outline"]},
    }

    spec = import_crewai(_dump(agents), _dump(tasks), owner=alice).workflow.draft

    prompts = {n["id"]: n["prompt"] for n in spec["nodes"]}
    assert "{outline}" not in prompts["outline"]
    assert "## outline\n{outline}" in prompts["draft"]
    assert "## outline\n{outline}" in prompts["polish"] and "{draft}" not in prompts["polish"]
    assert spec["input_schema"]["required"] == ["subject"]


def test_a_hierarchical_crew_file_makes_a_supervisor_with_the_agents_as_workers(alice):
    make_tool("search_notes", entrypoint="baton.search_notes")

    result = import_crewai(
        _read(HIERARCHICAL, "agents.yaml"),
        _read(HIERARCHICAL, "tasks.yaml"),
        _read(HIERARCHICAL, "crew.yaml"),
        owner=alice,
    )

    spec = result.workflow.draft
    assert result.workflow.name == "Product launch crew"
    (node,) = spec["nodes"]
    assert node["kind"] == "supervisor"
    assert node["agent"] == "project_manager"
    assert node["workers"] == ["market_researcher", "copywriter"]
    assert node["max_turns"] == 6
    for task in (
        "1. market_research",
        "2. launch_copy",
        "3. launch_plan",
        "Suggested worker: copywriter",
        "Expected output: A one-page launch plan.",
    ):
        assert task in node["prompt"]
    assert spec["input_schema"]["required"] == ["product", "region"]
    assert result.version is not None
    researcher = Agent.objects.get(name="market_researcher")
    assert researcher.model == "openai/gpt-4o-mini"
    assert [t.name for t in researcher.tools.all()] == ["search_notes"]
    assert Agent.objects.get(name="copywriter").model == "anthropic/claude-3-5-haiku-20241022"
    # Unknown tools are reported, not dropped silently; CrewAI runtime knobs are not problems.
    assert result.problems == [
        "Agent 'market_researcher': unknown tool 'SerperDevTool'. Baton has no tool of that "
        "name; the agent was created without it (add the tool in the admin, then give it to "
        "the agent)."
    ]


def test_the_hierarchical_flag_adds_a_manager_built_from_manager_llm(alice):
    crew = _dump({"manager_llm": "gpt-4o"})
    result = import_crewai(
        _read(LATEST_AI, "agents.yaml"),
        _read(LATEST_AI, "tasks.yaml"),
        crew,
        hierarchical=True,
        owner=alice,
    )

    (node,) = result.workflow.draft["nodes"]
    manager = Agent.objects.get(name=node["agent"])
    assert manager.name == "crew-manager"
    assert manager.model == "openai/gpt-4o"
    assert manager.role.name == "Crew Manager"
    assert node["workers"] == ["researcher", "reporting_analyst"]


@pytest.mark.parametrize(
    ("llm", "model", "certain"),
    [
        ("gpt-4o-mini", "openai/gpt-4o-mini", True),
        ("o3-mini", "openai/o3-mini", True),
        ("claude-3-5-sonnet-20241022", "anthropic/claude-3-5-sonnet-20241022", True),
        ("gemini-1.5-pro", "gemini/gemini-1.5-pro", True),
        ("mistral-large-latest", "mistral/mistral-large-latest", True),
        ("ollama/llama3.1", "ollama/llama3.1", True),
        ("groq/llama-3.1-70b-versatile", "groq/llama-3.1-70b-versatile", True),
        ("my-local-model", "my-local-model", False),
    ],
)
def test_crewai_llm_strings_map_to_litellm_model_strings(llm, model, certain):
    assert litellm_model(llm) == (model, certain)


def test_an_unrecognised_llm_is_kept_and_reported(alice):
    agents = {
        "a": {
            "role": "R",
            "goal": "G",
            "llm": {
                "model": "my-local-model",
                "temperature": 0.9,
                "base_url": "http://127.0.0.1:8080",
            },
        }
    }
    tasks = {"t": {"description": "Do it", "agent": "a"}}

    result = import_crewai(_dump(agents), _dump(tasks), owner=alice)

    agent = Agent.objects.get(name="a")
    assert (agent.model, agent.temperature, agent.api_base) == (
        "my-local-model",
        0.9,
        "http://127.0.0.1:8080",
    )
    assert any("llm 'my-local-model' has no provider prefix" in p for p in result.problems)


def test_existing_agents_and_roles_are_never_changed(alice):
    existing = make_agent("researcher", system_prompt="alice's researcher")

    _import_latest_ai(owner=alice)

    existing.refresh_from_db()
    assert existing.system_prompt == "alice's researcher"
    assert existing.role.name == "researcher role"
    imported = Workflow.objects.get().draft["nodes"][0]["agent"]
    assert imported == "researcher-2"
    assert Agent.objects.get(name="researcher-2").role.name == "{topic} Senior Data Researcher"


def test_importing_the_same_crew_twice_reuses_identical_roles(alice):
    _import_latest_ai(owner=alice)
    second = _import_latest_ai(owner=alice)

    assert Role.objects.filter(name__contains="Senior Data Researcher").count() == 1
    assert second.workflow.slug == "imported-crewai-crew-2"
    assert second.version is not None


def test_human_input_becomes_an_approval_gate_and_output_json_a_schema(alice):
    agents = {"a": {"role": "R", "goal": "G"}}
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    tasks = {
        "draft": {
            "description": "Draft {thing}",
            "agent": "a",
            "human_input": True,
            "output_json": schema,
        },
        "send": {"description": "Send it", "agent": "a", "output_pydantic": "Email"},
    }

    result = import_crewai(_dump(agents), _dump(tasks), owner=alice)

    spec = result.workflow.draft
    assert [(n["id"], n["kind"]) for n in spec["nodes"]] == [
        ("draft", "agent"),
        ("draft_review", "approval"),
        ("send", "agent"),
    ]
    assert spec["nodes"][0]["output_schema"] == schema
    assert spec["edges"] == [
        {"source": "draft", "target": "draft_review"},
        {"source": "draft_review", "target": "send"},
    ]
    assert "## draft\n{draft}" in spec["nodes"][2]["prompt"]
    assert any("output_pydantic names a Python class" in p for p in result.problems)
    assert result.version is not None


def test_keys_without_a_baton_equivalent_are_reported(alice):
    agents = {"a": {"role": "R", "goal": "G", "allow_code_execution": True, "verbose": True}}
    tasks = {
        "t": {"description": "Do it", "agent": "a", "async_execution": True, "output_file": "x.md"}
    }

    result = import_crewai(
        _dump(agents), _dump(tasks), _dump({"planning": True, "foo": 1}), owner=alice
    )

    assert sorted(result.problems) == [
        "Agent 'a': 'allow_code_execution' has no Baton equivalent and was ignored.",
        "Crew setting 'foo' has no Baton equivalent and was ignored.",
        "Task 't': 'async_execution' has no Baton equivalent and was ignored.",
    ]


@pytest.mark.parametrize(
    ("agents", "tasks", "crew", "message"),
    [
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"description": "D", "agent": "b"}},
            None,
            "Task 't' names agent 'b', which is not in agents.yaml",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"description": "D"}},
            None,
            "names no agent; a sequential crew needs one per task",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {
                "t": {"description": "D", "agent": "a", "context": ["u"]},
                "u": {"description": "E", "agent": "a"},
            },
            None,
            "context task 'u' does not run before it",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"description": "D", "agent": "a", "context": ["zzz"]}},
            None,
            "context names unknown task 'zzz'",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"agent": "a"}},
            None,
            "Task 't' has no description",
        ),
        (
            {"a": "just text"},
            {"t": {"description": "D", "agent": "a"}},
            None,
            "agents.yaml: 'a' must be a mapping",
        ),
        (
            [],
            {"t": {"description": "D", "agent": "a"}},
            None,
            "agents.yaml must be a mapping of names to definitions",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"description": "D", "agent": "a"}},
            {"process": "consensual"},
            "Unknown crew process 'consensual'",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"description": "D", "agent": "a"}},
            {"process": "hierarchical", "manager_agent": "boss"},
            "manager_agent 'boss' is not in agents.yaml",
        ),
        (
            {"a": {"role": "R", "goal": "G"}},
            {"t": {"description": "D", "agent": "a"}},
            {"process": "hierarchical", "manager_agent": "a"},
            "needs at least one agent besides its manager",
        ),
        (
            {"t": {"description": "D", "agent": "a"}},
            {"a": {"role": "R", "goal": "G"}},
            None,
            "look swapped",
        ),
    ],
)
def test_bad_crewai_input_gives_one_clear_error_and_creates_nothing(agents, tasks, crew, message):
    with pytest.raises(ImportFailed, match=message):
        import_crewai(
            _dump(agents) if not isinstance(agents, list) else "[]",
            _dump(tasks),
            _dump(crew) if crew else None,
        )
    assert not Workflow.objects.exists()
    assert not Agent.objects.exists()


@pytest.mark.parametrize(
    "agents, tasks, name, message",
    [
        ({"a": {"role": "R", "goal": "G"}}, {"t": {"agent": "a"}}, "\x00", "workflow's name"),
        ({"a": {"role": "R\x00", "goal": "G"}}, {"t": {"agent": "a"}}, "", "agents.yaml"),
        ({"a": {"role": "R", "goal": "G"}}, {"t": {"agent": "a", "x": ["\x00"]}}, "", "tasks"),
    ],
)
def test_parsed_crewai_documents_with_a_nul_character_are_refused_clearly(
    agents, tasks, name, message, alice
):
    """Parsed documents handed over directly (not through load_yaml) are checked as a file's."""
    with pytest.raises(ImportFailed, match=f"{message}.*NUL character"):
        import_crewai_documents(agents, tasks, owner=alice, name=name)
    assert not Workflow.objects.exists()


def test_malformed_crewai_yaml_names_the_file():
    with pytest.raises(ImportFailed, match="tasks.yaml is not valid YAML at line 3, column 2"):
        import_crewai(_read(LATEST_AI, "agents.yaml"), "t:\n  description: D\n agent: a\n")


# --- command ---------------------------------------------------------------------------------


class _Out:
    def __init__(self):
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_import_command_finds_the_config_folder_of_a_crewai_project(tmp_path, alice):
    config = tmp_path / "latest_ai" / "src" / "latest_ai" / "config"
    config.mkdir(parents=True)
    for name in ("agents.yaml", "tasks.yaml"):
        shutil.copy(LATEST_AI / name, config / name)
    out = _Out()

    call_command("import_workflow", str(tmp_path / "latest_ai"), "--owner", "alice", stdout=out)

    workflow = Workflow.objects.get(slug="latest-ai")
    assert workflow.owner == alice
    assert "Imported workflow 'latest-ai' (Latest ai): version 1 published." in out.text
    assert "created: agent 'researcher' (scripted/baton)" in out.text


def test_import_command_reads_a_crew_file_beside_the_pair(tmp_path):
    for name in ("agents.yaml", "tasks.yaml", "crew.yaml"):
        shutil.copy(HIERARCHICAL / name, tmp_path / name)
    out = _Out()

    call_command("import_workflow", str(tmp_path), stdout=out)

    assert Workflow.objects.get().draft["nodes"][0]["kind"] == "supervisor"
    assert "problem: Agent 'market_researcher': unknown tool 'SerperDevTool'" in out.text
    assert "problem: Agent 'market_researcher': unknown tool 'search_notes'" in out.text


def test_import_command_takes_a_file_pair_and_the_hierarchical_flag(alice):
    out = _Out()
    call_command(
        "import_workflow",
        str(LATEST_AI / "agents.yaml"),
        "--crewai-tasks",
        str(LATEST_AI / "tasks.yaml"),
        "--hierarchical",
        "--name",
        "Crew",
        stdout=out,
    )

    assert Workflow.objects.get(slug="crew").draft["nodes"][0]["kind"] == "supervisor"


def test_import_command_exits_2_for_a_folder_without_a_crewai_pair(tmp_path):
    (tmp_path / "agents.yaml").write_text("a: {role: R, goal: G}\n")
    with pytest.raises(CommandError, match="holds no agents.yaml with a tasks.yaml") as caught:
        call_command("import_workflow", str(tmp_path), stdout=_Out())
    assert caught.value.returncode == 2


def test_import_command_exits_2_for_a_bad_crew(tmp_path):
    (tmp_path / "agents.yaml").write_text("a: {role: R, goal: G}\n")
    (tmp_path / "tasks.yaml").write_text("t: {description: D, agent: nobody}\n")
    with pytest.raises(CommandError, match="names agent 'nobody'") as caught:
        call_command("import_workflow", str(tmp_path), stdout=_Out())
    assert caught.value.returncode == 2


# --- upload page ----------------------------------------------------------------------------


def _pair(folder: Path) -> dict:
    return {
        "agents_file": SimpleUploadedFile("agents.yaml", _read(folder, "agents.yaml")),
        "tasks_file": SimpleUploadedFile("tasks.yaml", _read(folder, "tasks.yaml")),
    }


def test_uploading_a_clean_crewai_pair_redirects_to_the_editor(client, bob):
    client.force_login(bob)

    response = client.post("/workflows/import/", {**_pair(LATEST_AI), "name": "Latest AI"})

    assert response.status_code == 302
    assert response["Location"] == "/workflows/latest-ai/edit/"
    workflow = Workflow.objects.get(slug="latest-ai")
    assert workflow.owner == bob
    assert [n["kind"] for n in workflow.draft["nodes"]] == ["agent", "agent"]


def test_uploading_with_the_hierarchical_box_makes_a_supervisor(client, bob):
    client.force_login(bob)

    client.post("/workflows/import/", {**_pair(LATEST_AI), "hierarchical": "on"})

    assert Workflow.objects.get().draft["nodes"][0]["kind"] == "supervisor"


def test_uploading_a_crew_with_unknown_tools_shows_the_problems(client, bob):
    client.force_login(bob)

    response = client.post("/workflows/import/", {**_pair(HIERARCHICAL), "hierarchical": "on"})

    assert response.status_code == 200
    page = response.content.decode()
    assert "unknown tool &#x27;SerperDevTool&#x27;" in page
    assert "Open the workflow" in page


def test_uploading_a_broken_crewai_pair_shows_the_error(client, bob):
    client.force_login(bob)
    response = client.post(
        "/workflows/import/",
        {
            "agents_file": SimpleUploadedFile("agents.yaml", b"a: {role: R, goal: G}\n"),
            "tasks_file": SimpleUploadedFile("tasks.yaml", b"t: {description: D, agent: b}\n"),
        },
    )
    assert response.status_code == 400
    assert "names agent &#x27;b&#x27;, which is not in agents.yaml" in response.content.decode()


# --- running what was imported ---------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("hierarchical", [False, True], ids=["sequential", "hierarchical"])
def test_an_imported_crew_runs_to_success_on_a_worker(celery_worker, alice, hierarchical):
    result = _import_latest_ai(owner=alice, hierarchical=hierarchical or None)

    run = engine.start_run(result.version, {"topic": "AI agents", "current_year": "2025"}, alice)
    run = engine.wait_for(run, timeout_s=90)

    assert run.status == Run.SUCCEEDED, run.error
    if hierarchical:
        assert run.state["manager"]["turns"] >= 2
    else:
        assert run.state["research_task"] and run.state["reporting_task"]
        first = run.steps.get(node_id="research_task").input["messages"][1]["content"]
        assert "For this task you are: AI agents Senior Data Researcher." in first
