"""Native YAML export and import: round trip, problems reported, bad files refused, old specs."""

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from teams.models import Agent, Role, Tool, Workflow, WorkflowVersion
from teams.spec import SCHEMA_VERSION, validate_spec
from teams.yaml_io import (
    MAX_IMPORT_BYTES,
    ImportFailed,
    export_data,
    export_workflow,
    import_yaml,
)
from tests.factories import make_agent, make_role, make_tool, make_workflow, pipeline_spec

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures"

EMAIL_ARGS = {
    "type": "object",
    "properties": {
        "to": {"type": "string"},
        "subject": {"type": "string"},
        "body": {"type": "string"},
    },
    "required": ["to", "subject", "body"],
}


def _full_workflow(owner) -> Workflow:
    """A workflow that uses every exportable field: tools with flags, fallback models,
    multi-line prompts, a vote node, a tool node, budgets, an approver group and a layout."""
    reviewers = Group.objects.create(name="reviewers")
    calculator = make_tool("calculator", description="Arithmetic.")
    email = make_tool(
        "send_email",
        entrypoint="baton.send_email",
        args_schema=EMAIL_ARGS,
        side_effect=True,
        requires_approval=True,
        approver_group=reviewers,
    )
    researcher_role = make_role("Researcher", goal="Find facts", backstory="Line one.\nLine two.")
    make_agent(
        "researcher",
        role=researcher_role,
        tools=[calculator, email],
        fallback_models=["openai/gpt-4o-mini", "ollama/llama3"],
        temperature=0.7,
        max_tokens=900,
        system_prompt="Be brief.\nCite your sources.",
        api_base="http://127.0.0.1:11434",
        max_retries=2,
        timeout_s=45,
        max_tool_rounds=3,
    )
    make_agent("critic", role=make_role("Critic", goal="Find flaws"))
    make_agent("judge", role=make_role("Judge", goal="Decide"))
    make_agent("unused", role=researcher_role)
    spec = {
        "schema_version": SCHEMA_VERSION,
        "input_schema": {
            "type": "object",
            "properties": {"topic": {"type": "string"}},
            "required": ["topic"],
        },
        "nodes": [
            {
                "id": "research",
                "kind": "agent",
                "agent": "researcher",
                "label": "Research",
                "prompt": "Research {topic}.\nList the facts.",
                "output_schema": {"type": "object", "properties": {"facts": {"type": "array"}}},
            },
            {
                "id": "vote",
                "kind": "vote",
                "agents": ["researcher", "critic"],
                "judge": "judge",
                "mode": "pick",
                "prompt": "Which facts matter about {topic}?",
            },
            {
                "id": "mail",
                "kind": "tool",
                "tool": "send_email",
                "args": {"to": "team@example.com", "subject": "{topic}", "body": "{vote}"},
            },
        ],
        "edges": [
            {"source": "research", "target": "vote"},
            {"source": "vote", "target": "mail"},
        ],
    }
    return make_workflow(
        spec,
        owner=owner,
        slug="full-export",
        name="Full export",
        description="Everything an export carries.\nOver two lines.",
        layout={
            "research": {"x": 80.0, "y": 80.0},
            "vote": {"x": 320.5, "y": 80.0},
            "mail": {"x": 560.0, "y": 220.0},
        },
        max_cost_per_run=Decimal("1.50"),
        max_tokens_per_run=40_000,
        max_tokens_per_step=4_000,
        max_steps_per_run=30,
        max_wall_s=600,
        daily_cost_cap=Decimal("10"),
        monthly_cost_cap=Decimal("200.25"),
        budget_policy="ask",
        approver_group=reviewers,
    )


def _empty_design_tables() -> None:
    WorkflowVersion.objects.all().delete()
    Workflow.objects.all().delete()
    Agent.objects.all().delete()
    Tool.objects.all().delete()
    Role.objects.all().delete()


def test_export_import_into_empty_database_and_export_again_is_identical(alice):
    workflow = _full_workflow(alice)
    first = export_workflow(workflow)

    _empty_design_tables()
    result = import_yaml(first, owner=alice)

    assert result.problems == []
    assert result.version is not None and result.version.number == 1
    assert result.version.layout == workflow.layout
    imported = Workflow.objects.get(slug="full-export")
    assert imported.owner == alice
    assert export_workflow(imported) == first


def test_export_carries_agents_tools_budgets_layout_and_markers(alice):
    data = yaml.safe_load(export_workflow(_full_workflow(alice)))

    assert data["baton_export"] == 1
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["workflow"]["budgets"]["max_cost_per_run"] == "1.5"
    assert data["workflow"]["budgets"]["budget_policy"] == "ask"
    assert data["workflow"]["approver_group"] == "reviewers"
    assert data["workflow"]["layout"]["vote"] == {"x": 320.5, "y": 80.0}
    assert [n["id"] for n in data["workflow"]["draft"]["nodes"]] == ["research", "vote", "mail"]
    # Only the agents the spec uses, with every field.
    assert [a["name"] for a in data["agents"]] == ["critic", "judge", "researcher"]
    researcher = data["agents"][2]
    assert researcher["fallback_models"] == ["openai/gpt-4o-mini", "ollama/llama3"]
    assert researcher["tools"] == ["calculator", "send_email"]
    assert researcher["system_prompt"] == "Be brief.\nCite your sources."
    assert (researcher["max_retries"], researcher["timeout_s"]) == (2, 45)
    email = next(t for t in data["tools"] if t["name"] == "send_email")
    assert email["entrypoint"] == "baton.send_email"
    assert email["side_effect"] is True and email["requires_approval"] is True
    assert email["args_schema"] == EMAIL_ARGS
    assert email["approver_group"] == "reviewers"


def test_multi_line_texts_are_written_as_readable_blocks(alice):
    text = export_workflow(_full_workflow(alice))
    assert "system_prompt: |-\n    Be brief.\n    Cite your sources." in text


def test_tool_with_unregistered_entrypoint_is_reported_not_created_and_draft_kept(alice):
    document = {
        "baton_export": 1,
        "schema_version": 2,
        "workflow": {
            "name": "Shell",
            "slug": "shell",
            "draft": {
                "input_schema": {"type": "object", "properties": {}},
                "nodes": [
                    {"id": "work", "kind": "agent", "agent": "hacker", "prompt": "go"},
                    {"id": "run", "kind": "tool", "tool": "shell", "args": {}},
                ],
                "edges": [{"source": "work", "target": "run"}],
            },
        },
        "roles": [{"name": "Hacker", "goal": "Run things"}],
        "tools": [
            {
                "name": "shell",
                "description": "Runs a command",
                "entrypoint": "os.system",
                "args_schema": {},
            }
        ],
        "agents": [{"name": "hacker", "role": "Hacker", "tools": ["shell"]}],
    }

    result = import_yaml(yaml.safe_dump(document), owner=alice)

    assert not Tool.objects.filter(name="shell").exists()
    assert any("'shell'" in p and "os.system" in p and "registry" in p for p in result.problems)
    assert any("tool 'shell' is not available" in p for p in result.problems)
    assert list(Agent.objects.get(name="hacker").tools.all()) == []
    assert result.version is None
    assert any("Not published" in p and "unknown tool 'shell'" in p for p in result.problems)
    assert Workflow.objects.get(slug="shell").draft["nodes"][1]["tool"] == "shell"


def test_import_with_a_taken_slug_creates_a_new_slug(alice):
    workflow = _full_workflow(alice)
    text = export_workflow(workflow)

    result = import_yaml(text, owner=alice)

    assert result.workflow.slug == "full-export-2"
    assert any("imported as 'full-export-2'" in p for p in result.problems)
    assert result.version is not None
    assert Workflow.objects.get(slug="full-export").versions.count() == 1


def test_replace_publishes_a_new_version_of_the_existing_workflow(alice):
    workflow = _full_workflow(alice)
    data = export_data(workflow)
    data["workflow"]["draft"]["nodes"][0]["prompt"] = "Research {topic} again."
    data["workflow"]["budgets"]["max_steps_per_run"] = 12

    result = import_yaml(yaml.safe_dump(data), owner=alice, replace=True)

    assert result.workflow.pk == workflow.pk
    workflow.refresh_from_db()
    assert workflow.max_steps_per_run == 12
    assert workflow.latest_version().number == 2
    assert workflow.latest_version().spec["nodes"][0]["prompt"] == "Research {topic} again."


def test_replace_is_refused_for_a_workflow_the_user_cannot_see(alice, charlie):
    text = export_workflow(_full_workflow(alice))
    with pytest.raises(ImportFailed, match="may not replace"):
        import_yaml(text, owner=charlie, replace=True)


def test_trusted_import_updates_an_existing_agent(alice):
    text = export_workflow(_full_workflow(alice))
    Agent.objects.filter(name="critic").update(system_prompt="changed here", temperature=1.0)

    result = import_yaml(text, owner=alice, trusted=True)

    critic = Agent.objects.get(name="critic")
    assert (critic.system_prompt, critic.temperature) == ("", 0.2)
    assert "updated agent 'critic'" in result.created


def test_untrusted_import_never_changes_shared_rows_and_renames_instead(alice, bob):
    text = export_workflow(_full_workflow(alice))
    Agent.objects.filter(name="critic").update(system_prompt="alice's critic")
    Role.objects.filter(name="Judge").update(goal="alice's judge")
    Tool.objects.filter(name="calculator").delete()

    result = import_yaml(text, owner=bob, trusted=False)

    assert Agent.objects.get(name="critic").system_prompt == "alice's critic"
    assert Role.objects.get(name="Judge").goal == "alice's judge"
    assert Agent.objects.get(name="critic-2").system_prompt == ""
    assert Role.objects.get(name="Judge-2").goal == "Decide"
    assert not Tool.objects.filter(name="calculator").exists()
    assert any("Tool 'calculator'" in p and "only staff" in p for p in result.problems)
    vote = result.workflow.draft["nodes"][1]
    assert vote["agents"] == ["researcher", "critic-2"]
    assert result.workflow.owner == bob


def test_an_agent_with_an_invalid_field_is_reported_and_skipped(alice):
    make_role("Writer", goal="Write")
    document = {
        "baton_export": 1,
        "workflow": {"name": "Bad agent", "draft": pipeline_spec("writer")},
        "agents": [{"name": "writer", "role": "Writer", "temperature": "hot"}],
    }

    result = import_yaml(yaml.safe_dump(document), owner=alice)

    assert not Agent.objects.filter(name="writer").exists()
    assert any(p.startswith("Agent 'writer' not imported: temperature") for p in result.problems)
    assert result.workflow.slug == "bad-agent"
    assert result.version is None


def test_an_oversized_file_is_refused_with_its_size():
    data = b"# " + b"x" * MAX_IMPORT_BYTES
    with pytest.raises(ImportFailed, match="too large .* the limit is 1,048,576 bytes"):
        import_yaml(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("baton_export: 1\nworkflow: [unclosed\n", "not valid YAML at line 3"),
        ("baton_export: 1\n\tworkflow: {}\n", "not valid YAML at line 2"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("- just\n- a list\n", "not a Baton export"),
        ("baton_export: 7\nworkflow: {}\n", "Unsupported export format 7"),
        ("baton_export: 1\nschema_version: 99\nworkflow: {}\n", "Unsupported schema_version"),
        ("baton_export: 1\n", "no `workflow` section"),
        ("baton_export: 1\nworkflow: {draft: [1]}\n", "must be a mapping"),
        ("baton_export: 1\nworkflow: {slug: 'not a slug!'}\n", "not a valid slug"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_bad_files_give_one_clear_error(text, message):
    with pytest.raises(ImportFailed, match=message):
        import_yaml(text)
    assert not Workflow.objects.exists()


def test_an_alias_bomb_is_refused_before_it_expands():
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for n in range(1, 10):
        lines.append(f"a{n}: &a{n} [" + ",".join([f"*a{n - 1}"] * 9) + "]")
    bomb = "baton_export: 1\n" + "\n".join(lines) + "\nworkflow: {draft: {nodes: *a9}}\n"
    with pytest.raises(ImportFailed, match="expands to more than"):
        import_yaml(bomb)


def test_a_schema_version_1_export_is_upgraded_on_import(alice):
    result = import_yaml((FIXTURES / "baton_v1_export.yaml").read_bytes(), owner=alice)

    assert result.problems == []
    spec = result.workflow.draft
    assert spec["schema_version"] == SCHEMA_VERSION
    assert [n["kind"] for n in spec["nodes"]] == ["agent", "agent"]
    assert spec["edges"] == [{"source": "draft", "target": "check"}]
    assert result.version.spec == spec
    assert result.workflow.max_cost_per_run == Decimal("0.25")
    assert result.workflow.layout["check"] == {"x": 320.0, "y": 80.0}


def test_a_version_saved_with_schema_version_1_is_upgraded_by_get_spec(alice):
    make_agent("writer")
    workflow = Workflow.objects.create(name="Old", slug="old", owner=alice)
    old_spec = {
        "input_schema": {"type": "object", "properties": {}},
        "nodes": [
            {"id": "a", "type": "agent", "agent": "writer"},
            {"id": "b", "type": "agent", "agent": "writer"},
        ],
        "edges": [{"from": "a", "to": "b"}],
    }
    version = WorkflowVersion.objects.create(
        workflow=workflow, number=1, spec=old_spec, schema_version=1
    )

    spec = WorkflowVersion.objects.get(pk=version.pk).get_spec()

    assert spec["nodes"][0]["kind"] == "agent" and "type" not in spec["nodes"][0]
    assert spec["edges"] == [{"source": "a", "target": "b"}]
    assert validate_spec(spec, known_agents={"writer"}) == []
    # Upgrading on load never rewrites the stored, immutable version.
    assert WorkflowVersion.objects.get(pk=version.pk).spec == old_spec


# --- management commands --------------------------------------------------------------------


def test_import_command_prints_what_it_created_and_each_problem(tmp_path, alice):
    text = export_workflow(_full_workflow(alice))
    text = text.replace("entrypoint: baton.calculator", "entrypoint: baton.rm_rf")
    path = tmp_path / "export.yaml"
    path.write_text(text)
    out = []

    call_command("import_workflow", str(path), "--owner", "alice", stdout=_Lines(out))

    output = "".join(out)
    assert "Imported workflow 'full-export-2'" in output
    assert "version 1 published" in output
    assert "problem: Tool 'calculator' not imported: its entrypoint 'baton.rm_rf'" in output
    assert "problem: A workflow with the slug 'full-export' exists" in output
    assert Workflow.objects.get(slug="full-export-2").owner == alice


def test_import_command_replace_updates_the_workflow(tmp_path, alice):
    workflow = _full_workflow(alice)
    path = tmp_path / "export.yaml"
    path.write_text(export_workflow(workflow))

    call_command("import_workflow", str(path), "--replace", stdout=_Lines([]))

    assert Workflow.objects.count() == 1
    assert workflow.versions.count() == 2


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("missing.yaml", None, [], "does not exist"),
        ("broken.yaml", "baton_export: 1\nworkflow: [\n", [], "is not valid YAML at line"),
        ("agents.yaml", "a:\n  role: R\n  goal: G\n", [], "pass its tasks.yaml"),
        ("tasks.yaml", "t:\n  description: D\n  agent: a\n", [], "pass the agents.yaml"),
        ("other.yaml", "hello: world\n", [], "neither a Baton export"),
        ("ok.yaml", "baton_export: 1\nworkflow: {}\n", ["--owner", "nobody"], "No user named"),
    ],
)
def test_import_command_exits_2_with_one_line_on_bad_input(tmp_path, name, content, extra, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CommandError, match=message) as caught:
        call_command("import_workflow", str(path), *extra, stdout=_Lines([]))
    assert caught.value.returncode == 2
    assert "\n" not in str(caught.value)


def test_export_command_prints_yaml_or_writes_a_file(tmp_path, alice):
    workflow = _full_workflow(alice)
    out = []
    call_command("export_workflow", "full-export", stdout=_Lines(out))
    assert "".join(out) == export_workflow(workflow)

    target = tmp_path / "full.yaml"
    call_command("export_workflow", "full-export", "-o", str(target), stderr=_Lines([]))
    assert target.read_text() == export_workflow(workflow)


def test_export_command_exits_2_for_an_unknown_slug():
    with pytest.raises(CommandError, match="No workflow with the slug 'nope'") as caught:
        call_command("export_workflow", "nope")
    assert caught.value.returncode == 2


class _Lines:
    """A stdout for call_command that keeps what was written."""

    def __init__(self, sink: list):
        self.sink = sink

    def write(self, text: str) -> None:
        self.sink.append(text)

    def flush(self) -> None:
        pass


# --- pages ----------------------------------------------------------------------------------


def test_a_member_downloads_the_export(client, alice, bob):
    workflow = _full_workflow(alice)
    workflow.members.add(bob)
    client.force_login(bob)

    response = client.get("/workflows/full-export/export/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/yaml")
    assert response["Content-Disposition"] == 'attachment; filename="full-export.yaml"'
    assert response.content.decode() == export_workflow(workflow)


def test_an_outsider_gets_404_on_export(client, alice, charlie):
    _full_workflow(alice)
    client.force_login(charlie)
    assert client.get("/workflows/full-export/export/").status_code == 404


def test_import_page_requires_login(client):
    response = client.get("/workflows/import/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_uploading_a_clean_export_redirects_to_the_editor(client, alice, admin_user):
    text = export_workflow(_full_workflow(alice))
    _empty_design_tables()
    client.force_login(admin_user)

    response = client.post(
        "/workflows/import/",
        {
            "file": SimpleUploadedFile("full.yaml", text.encode(), "application/yaml"),
        },
    )

    assert response.status_code == 302
    assert response["Location"] == "/workflows/full-export/edit/"
    workflow = Workflow.objects.get(slug="full-export")
    assert workflow.owner == admin_user
    assert workflow.latest_version() is not None


def test_uploading_an_export_with_problems_lists_them(client, alice, bob):
    text = export_workflow(_full_workflow(alice))
    Tool.objects.filter(name="send_email").delete()
    client.force_login(bob)

    response = client.post(
        "/workflows/import/",
        {
            "file": SimpleUploadedFile("full.yaml", text.encode(), "application/yaml"),
        },
    )

    assert response.status_code == 200
    page = response.content.decode()
    assert "Tool &#x27;send_email&#x27; is not on this Baton and only staff may add tools" in page
    assert 'href="/workflows/full-export-2/edit/"' in page
    assert Workflow.objects.get(slug="full-export-2").owner == bob


def test_uploading_a_malformed_file_shows_the_error(client, bob):
    client.force_login(bob)
    response = client.post(
        "/workflows/import/",
        {
            "file": SimpleUploadedFile("bad.yaml", b"baton_export: 1\nworkflow: [\n"),
        },
    )
    assert response.status_code == 400
    assert "is not valid YAML at line 3" in response.content.decode()
    assert not Workflow.objects.exists()


def test_uploading_an_oversized_file_shows_the_limit(client, bob):
    client.force_login(bob)
    response = client.post(
        "/workflows/import/",
        {
            "file": SimpleUploadedFile("big.yaml", b"#" * (MAX_IMPORT_BYTES + 10)),
        },
    )
    assert response.status_code == 400
    assert "the limit is 1,048,576 bytes" in response.content.decode()


def test_uploading_nothing_or_half_a_crewai_pair_is_refused(client, bob):
    client.force_login(bob)
    assert "Choose a file to import." in client.post("/workflows/import/", {}).content.decode()
    response = client.post(
        "/workflows/import/",
        {
            "agents_file": SimpleUploadedFile("agents.yaml", b"a: {role: R, goal: G}\n"),
        },
    )
    assert response.status_code == 400
    assert "needs both agents.yaml and tasks.yaml" in response.content.decode()
