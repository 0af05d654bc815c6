"""The spec validator reports every problem with the node or edge it belongs to."""

import copy

import pytest

from teams.spec import SCHEMA_VERSION, Problem, upgrade_spec, validate_spec

TOPIC = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}


def spec(nodes: list[dict], edges: list[dict] | None = None, **extra) -> dict:
    return {"input_schema": TOPIC, "nodes": nodes, "edges": edges or [], **extra}


def agent(node_id: str, name: str = "writer", **fields) -> dict:
    return {"id": node_id, "kind": "agent", "agent": name, "prompt": "Work on {topic}", **fields}


def edge(source: str, target: str, **fields) -> dict:
    return {"source": source, "target": target, **fields}


def messages(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems]


def only_problem(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, messages(problems)
    return problems[0]


# --- a spec with every node kind ------------------------------------------------------------

EVERY_KIND = spec(
    [
        {"id": "classify", "kind": "router", "label": "Which way?"},
        agent("research", "researcher", output_schema={"type": "object"}),
        {"id": "lookup", "kind": "tool", "tool": "search_notes", "args": {"query": "{topic}"}},
        {"id": "fan_out", "kind": "parallel", "branch_timeout_s": 60},
        {
            "id": "team",
            "kind": "supervisor",
            "agent": "lead",
            "workers": ["researcher", "writer"],
            "max_turns": 4,
            "prompt": "Coordinate on {topic}",
        },
        {
            "id": "ballot",
            "kind": "vote",
            "agents": ["researcher", "writer"],
            "judge": "lead",
            "mode": "synthesise",
            "prompt": "Answer {topic}",
        },
        {
            "id": "argue",
            "kind": "debate",
            "agents": ["researcher", "writer"],
            "judge": "lead",
            "max_rounds": 3,
            "summarise_after_tokens": 2000,
            "prompt": "Debate {topic}",
        },
        {"id": "gather", "kind": "join", "on_branch_failure": "continue"},
        {
            "id": "child",
            "kind": "subworkflow",
            "workflow": "summarise",
            "version": 1,
            "input": {"text": "{gather}"},
        },
        {
            "id": "sign_off",
            "kind": "approval",
            "title": "Ship it?",
            "due_in_s": 3600,
            "default_outcome": "reject",
        },
        agent("publish", "writer"),
    ],
    [
        edge(
            "classify", "research", condition={"path": "topic", "op": "contains", "value": "facts"}
        ),
        edge("classify", "lookup", default=True),
        edge("research", "fan_out"),
        edge("lookup", "fan_out"),
        edge("fan_out", "team"),
        edge("fan_out", "ballot"),
        edge("fan_out", "argue"),
        edge("team", "gather"),
        edge("ballot", "gather"),
        edge("argue", "gather"),
        edge("gather", "child"),
        edge("child", "sign_off"),
        edge("sign_off", "publish"),
        # A bounded loop back for another round of research when the approval is rejected.
        edge("sign_off", "research", on="rejected", max_iterations=2),
    ],
    state_schema={"type": "object"},
)
KNOWN = {
    "known_agents": {"researcher", "writer", "lead"},
    "known_tools": {"search_notes"},
    "known_workflows": {"summarise"},
}


def test_a_spec_with_every_node_kind_is_valid():
    kinds = {node["kind"] for node in EVERY_KIND["nodes"]}
    assert kinds == {
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
    }
    assert validate_spec(EVERY_KIND) == []
    assert validate_spec(EVERY_KIND, **KNOWN) == []


def test_a_linear_pipeline_is_valid():
    assert validate_spec(spec([agent("a"), agent("b")], [edge("a", "b")])) == []


# --- each problem kind ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], "nodes", 3])
def test_a_spec_that_is_not_an_object_is_refused(value):
    assert messages(validate_spec(value)) == ["The spec must be a JSON object."]


@pytest.mark.parametrize("nodes", [None, [], "a"])
def test_a_spec_without_nodes_is_refused(nodes):
    problem = only_problem(validate_spec({"input_schema": TOPIC, "nodes": nodes}))
    assert "non-empty list of nodes" in problem.message


def test_unknown_node_kind_is_reported_on_its_node():
    problem = only_problem(
        validate_spec(spec([agent("a"), {"id": "b", "kind": "magic"}], [edge("a", "b")]))
    )
    assert problem.node == "b"
    assert "unknown node kind 'magic'" in problem.message


def test_an_agent_node_without_an_agent_is_reported():
    problem = only_problem(validate_spec(spec([{"id": "a", "kind": "agent", "prompt": "x"}])))
    assert problem.node == "a"
    assert "missing agent" in problem.message


def test_an_unknown_agent_is_reported_only_when_known_names_are_given():
    workflow = spec([agent("a", "ghost")])
    assert validate_spec(workflow) == []
    problem = only_problem(validate_spec(workflow, known_agents={"writer"}))
    assert (problem.node, problem.message) == ("a", "unknown agent 'ghost'")


def test_unknown_tools_workflows_and_team_members_are_reported():
    workflow = spec(
        [
            {"id": "t", "kind": "tool", "tool": "nuke"},
            {"id": "s", "kind": "subworkflow", "workflow": "missing"},
            {"id": "v", "kind": "vote", "agents": ["writer", "ghost"], "judge": "writer"},
        ],
        [edge("t", "s"), edge("s", "v")],
    )
    found = messages(
        validate_spec(workflow, known_agents={"writer"}, known_tools=set(), known_workflows=set())
    )
    assert "node 't': unknown tool 'nuke'" in found
    assert "node 's': unknown workflow 'missing'" in found
    assert "node 'v': unknown agent 'ghost' in `agents`" in found
    assert len(found) == 3


def test_an_edge_to_nowhere_is_reported_on_the_edge():
    problem = only_problem(validate_spec(spec([agent("a")], [edge("a", "nowhere")])))
    assert problem.edge == 0
    assert "target 'nowhere' is not a node" in problem.message
    assert str(problem).startswith("edge 1:")


def test_an_edge_from_nowhere_is_reported_too():
    problem = only_problem(validate_spec(spec([agent("a")], [edge("ghost", "a")])))
    assert "source 'ghost' is not a node" in problem.message


def test_an_unreachable_node_is_reported():
    problem = only_problem(
        validate_spec(spec([agent("a"), agent("b"), agent("island")], [edge("a", "b")]))
    )
    assert (problem.node, problem.message) == ("island", "unreachable from the entry node")


def test_a_cycle_without_a_loop_bound_is_reported():
    looping = spec(
        [agent("draft"), agent("review")], [edge("draft", "review"), edge("review", "draft")]
    )
    problem = only_problem(validate_spec(looping))
    assert "cycle without a loop bound" in problem.message
    assert "draft -> review -> draft" in problem.message


def test_the_same_cycle_with_max_iterations_is_valid():
    bounded = spec(
        [agent("draft"), agent("review")],
        [edge("draft", "review"), edge("review", "draft", max_iterations=3)],
    )
    assert validate_spec(bounded) == []


@pytest.mark.parametrize("bound", [0, -1, "3", True, 1.5])
def test_a_loop_bound_must_be_a_positive_whole_number(bound):
    looping = spec([agent("a"), agent("b")], [edge("a", "b"), edge("b", "a", max_iterations=bound)])
    assert "max_iterations must be a whole number >= 1" in messages(validate_spec(looping))[0]


def test_a_join_with_fewer_than_two_inputs_is_reported():
    problem = only_problem(
        validate_spec(spec([agent("a"), {"id": "j", "kind": "join"}], [edge("a", "j")]))
    )
    assert (problem.node, problem.message) == ("j", "a join needs at least two inputs")


def test_a_router_without_a_default_edge_is_reported():
    router = spec(
        [{"id": "r", "kind": "router"}, agent("yes"), agent("no")],
        [
            edge("r", "yes", condition={"path": "ok", "op": "truthy"}),
            edge("r", "no", condition={"path": "ok", "op": "eq", "value": False}),
        ],
    )
    problem = only_problem(validate_spec(router))
    assert (problem.node, problem.message) == ("r", "a router needs a default edge")


def test_a_router_with_a_default_edge_is_valid():
    router = spec(
        [{"id": "r", "kind": "router"}, agent("yes"), agent("no")],
        [edge("r", "yes", condition={"path": "ok", "op": "truthy"}), edge("r", "no", default=True)],
    )
    assert validate_spec(router) == []


def test_an_llm_router_needs_labels_on_its_edges():
    router = spec(
        [{"id": "r", "kind": "router", "agent": "writer"}, agent("a"), agent("b")],
        [edge("r", "a", label="facts"), edge("r", "b", default=True)],
    )
    problem = only_problem(validate_spec(router))
    assert "label on every outgoing edge" in problem.message


def test_a_default_edge_outside_a_router_is_reported():
    problem = only_problem(
        validate_spec(spec([agent("a"), agent("b")], [edge("a", "b", default=True)]))
    )
    assert "only a router's edges can be default" in problem.message


def test_a_parallel_node_with_one_branch_is_reported():
    problem = only_problem(
        validate_spec(spec([{"id": "p", "kind": "parallel"}, agent("a")], [edge("p", "a")]))
    )
    assert (problem.node, problem.message) == ("p", "a parallel node needs at least two branches")


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("ok == true", "condition must be an object"),
        ({"op": "eq", "value": 1}, "condition needs a `path`"),
        ({"path": "score", "op": "approximately"}, "condition op must be one of"),
    ],
)
def test_a_bad_condition_is_reported_on_its_edge(condition, expected):
    router = spec(
        [{"id": "r", "kind": "router"}, agent("a"), agent("b")],
        [edge("r", "a", condition=condition), edge("r", "b", default=True)],
    )
    problem = only_problem(validate_spec(router))
    assert problem.edge == 0
    assert expected in problem.message


@pytest.mark.parametrize(
    ("input_schema", "expected"),
    [
        (None, "`input_schema` is required"),
        ("topic", "`input_schema` must be a JSON schema object"),
        ({"type": "banana"}, "`input_schema` is not a valid JSON schema"),
    ],
)
def test_a_bad_input_schema_is_reported(input_schema, expected):
    workflow = spec([agent("a")])
    workflow["input_schema"] = input_schema
    problem = only_problem(validate_spec(workflow))
    assert expected in problem.message


def test_a_bad_output_schema_is_reported_on_its_node():
    problem = only_problem(validate_spec(spec([agent("a", output_schema={"type": 12})])))
    assert problem.node == "a"
    assert "output schema" in problem.message


def test_duplicate_node_ids_are_reported():
    problem = only_problem(validate_spec(spec([agent("a"), agent("a")])))
    assert (problem.node, problem.message) == ("a", "duplicate node id")


def test_a_node_without_an_id_is_reported():
    problem = only_problem(validate_spec(spec([agent("a"), {"kind": "agent", "agent": "x"}])))
    assert "node 2 needs a text `id`" in problem.message


def test_a_missing_entry_node_is_reported():
    problem = only_problem(validate_spec(spec([agent("a")], entry="start")))
    assert "entry node 'start' does not exist" in problem.message


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (
            {"id": "x", "kind": "vote", "agents": ["writer"], "judge": "writer"},
            "`agents` needs at least 2 agent(s)",
        ),
        ({"id": "x", "kind": "debate", "agents": ["a", "b"]}, "missing judge agent"),
        (
            {"id": "x", "kind": "vote", "agents": ["a", "b"], "judge": "a", "mode": "shout"},
            "mode must be 'pick' or 'synthesise'",
        ),
        (
            {"id": "x", "kind": "supervisor", "agent": "lead", "workers": []},
            "`workers` needs at least 1 agent(s)",
        ),
        (
            {"id": "x", "kind": "supervisor", "agent": "lead", "workers": ["a"], "max_turns": 0},
            "`max_turns` must be a whole number >= 1",
        ),
        ({"id": "x", "kind": "tool"}, "missing tool"),
        ({"id": "x", "kind": "tool", "tool": "t", "args": ["a"]}, "`args` must be an object"),
        ({"id": "x", "kind": "subworkflow"}, "missing workflow"),
        (
            {"id": "x", "kind": "join", "on_branch_failure": "shrug"},
            "on_branch_failure must be 'fail' or 'continue'",
        ),
        (
            {"id": "x", "kind": "approval", "default_outcome": "maybe"},
            "default_outcome must be 'approve' or 'reject'",
        ),
    ],
)
def test_node_kind_specific_problems_are_reported(node, expected):
    found = messages(validate_spec(spec([node])))
    assert any(expected in message for message in found), found
    assert all(message.startswith("node 'x':") for message in found if expected in message)


def test_every_problem_is_reported_at_once():
    broken = spec(
        [agent("a"), {"id": "b", "kind": "magic"}, agent("c"), {"id": "j", "kind": "join"}],
        [edge("a", "j"), edge("a", "nowhere")],
    )
    found = messages(validate_spec(broken))
    assert "node 'b': unknown node kind 'magic'" in found
    assert "node 'b': unreachable from the entry node" in found
    assert "node 'c': unreachable from the entry node" in found
    assert "node 'j': a join needs at least two inputs" in found
    assert "edge 2: target 'nowhere' is not a node" in found


def test_validation_does_not_change_the_spec():
    original = copy.deepcopy(EVERY_KIND)
    validate_spec(EVERY_KIND, **KNOWN)
    assert EVERY_KIND == original


# --- upgrades -------------------------------------------------------------------------------


def test_upgrade_turns_a_version_1_spec_into_the_current_format():
    old = {
        "schema_version": 1,
        "input_schema": TOPIC,
        "nodes": [
            {"id": "a", "type": "agent", "agent": "writer"},
            {"id": "b", "type": "agent", "agent": "writer"},
        ],
        "edges": [{"from": "a", "to": "b"}],
    }
    before = copy.deepcopy(old)

    new = upgrade_spec(old)

    assert new["schema_version"] == SCHEMA_VERSION
    assert [n["kind"] for n in new["nodes"]] == ["agent", "agent"]
    assert all("type" not in n for n in new["nodes"])
    assert new["edges"] == [{"source": "a", "target": "b"}]
    assert validate_spec(new) == []
    assert old == before, "upgrade_spec must not change its argument"


def test_upgrade_recognises_a_version_1_spec_without_a_version_number():
    old = {
        "input_schema": TOPIC,
        "nodes": [{"id": "a", "type": "agent", "agent": "w"}],
        "edges": [],
    }
    assert upgrade_spec(old)["nodes"][0]["kind"] == "agent"


def test_a_version_1_spec_is_invalid_until_upgraded():
    old = {
        "schema_version": 1,
        "input_schema": TOPIC,
        "nodes": [{"id": "a", "type": "agent", "agent": "w"}],
        "edges": [],
    }
    assert "unknown node kind None" in messages(validate_spec(old))[0]
    assert validate_spec(upgrade_spec(old)) == []


def test_upgrading_a_current_spec_changes_nothing():
    assert upgrade_spec(EVERY_KIND) == {**EVERY_KIND, "schema_version": SCHEMA_VERSION}
