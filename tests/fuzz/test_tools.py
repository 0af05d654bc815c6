"""Tool calls with random arguments: the built-in tools return JSON or raise an ordinary
exception, quickly; the engine's tool call turns whatever happens into a result or an error
for the agent and never raises."""

import json
import time

import pytest
from django.db import transaction
from hypothesis import given, settings
from hypothesis import strategies as st

from runs.context import StepContext
from runs.models import Run, Step, ToolCall, ToolHealth
from teams import tools as tool_registry
from teams.models import Tool
from tests.factories import make_tool, make_workflow
from tests.fuzz import FUZZ, KEY_TEXT, TEXT, json_values

pytestmark = pytest.mark.django_db

# A tool call blocks a worker thread: one must never take long, whatever its arguments.
MAX_CALL_S = 2.0

NUMBERS = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6).map(str),
    st.sampled_from(["0", "0.0", "1e308", "9", "99", "1e-320", "True", "1_000", "0x10"]),
)


def _expressions(max_leaves: int = 12) -> st.SearchStrategy:
    """Arithmetic the calculator is meant for, nested in every way, plus operators it refuses."""

    def combine(children):
        return st.one_of(
            st.tuples(
                children,
                st.sampled_from(["+", "-", "*", "/", "**", "%", "//", "<<", "@"]),
                children,
            ).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
            children.map(lambda e: f"({e})"),
            children.map(lambda e: f"-{e}"),
        )

    return st.recursive(NUMBERS, combine, max_leaves=max_leaves)


EXPRESSIONS = st.one_of(
    _expressions(),
    TEXT,
    st.sampled_from(
        [
            "__import__('os').system('true')",
            "().__class__",
            "a",
            "1 if 1 else 2",
            "[1, 2]",
            "lambda: 1",
            "1; 2",
            "(" * 150 + "1" + ")" * 150,
            "-" * 199 + "1",
            "\x00",
            "1e308 * 10",
            "-(1e308 * 10) - -(1e308 * 10)",
            "9 ** 99",
            "1 / 0",
            "2 ** 0.5",
            "(-8) ** (1 / 3)",
        ]
    ),
)

ARGUMENT_VALUES = st.one_of(json_values(6), EXPRESSIONS)
ARGUMENT_NAMES = st.sampled_from(
    ["expression", "text", "query", "title", "body", "to", "subject", "fail"]
)
ARGUMENTS = st.one_of(
    st.dictionaries(ARGUMENT_NAMES, ARGUMENT_VALUES, max_size=4),
    st.fixed_dictionaries({"expression": EXPRESSIONS}),
)


def _json_or_none(value) -> bool:
    json.dumps(value, allow_nan=False)
    return True


@settings(FUZZ, max_examples=600)
@given(
    entrypoint=st.sampled_from(sorted(tool_registry.REGISTRY)),
    args=ARGUMENTS,
    key=st.text(min_size=1, max_size=20),
)
def test_builtin_tools_answer_json_or_raise_an_exception_quickly(entrypoint, args, key):
    ctx = tool_registry.ToolContext(run_id=1, step_id=1, idempotency_key=key)
    started = time.monotonic()
    with transaction.atomic():
        try:
            result = tool_registry.call(entrypoint, args, ctx)
        except Exception:  # noqa: BLE001 - the engine turns any Exception into an error result
            result = None
        transaction.set_rollback(True)
    assert time.monotonic() - started < MAX_CALL_S, f"{entrypoint}({args!r}) is too slow"
    assert _json_or_none(result)


def test_the_calculator_refuses_a_result_too_large_to_compute_quickly():
    """`((9**99)**99)**99` checks each exponent (99 <= 100) but its result has 3 million bits:
    a 40-character expression keeps a worker busy for minutes and takes gigabytes (one more
    `**99` level). The calculator must refuse it before computing it."""
    ctx = tool_registry.ToolContext(run_id=1, step_id=1, idempotency_key="k")
    started = time.monotonic()
    with pytest.raises(ValueError):
        tool_registry.call("baton.calculator", {"expression": "((9**99)**99)**99"}, ctx)
    assert time.monotonic() - started < 0.1


# --- through the engine ----------------------------------------------------------------------

SCHEMAS = {
    "calculator": {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
    "word_count": {"type": "object", "properties": {"text": {"type": "string"}}},
    "search_notes": {},
    "publish_report": {
        "type": "object",
        "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
    },
    "send_email": {
        "type": "object",
        "properties": {"to": {"type": "string", "format": "email"}},
        "required": ["to"],
        "additionalProperties": True,
    },
    "flaky": {"type": "object", "properties": {"fail": {"type": "boolean"}}},
}


@pytest.fixture
def step_context(alice):
    for name, schema in SCHEMAS.items():
        make_tool(
            name,
            entrypoint=f"baton.{name}",
            args_schema=schema,
            side_effect=name in ("publish_report", "send_email"),
        )
    workflow = make_workflow(
        {"nodes": [{"id": "calc", "kind": "tool", "tool": "calculator"}], "edges": []},
        owner=alice,
        slug="tools",
    )
    run = Run.objects.create(
        workflow=workflow, version=workflow.latest_version(), status=Run.RUNNING, started_by=alice
    )
    step = Step.objects.create(run=run, node_id="calc", kind="tool", status=Step.RUNNING, attempt=1)
    spec = workflow.latest_version().get_spec()
    return StepContext(step, run, spec["nodes"][0], spec)


def _assert_outcome(outcome: dict) -> None:
    assert set(outcome) in ({"result"}, {"error"}), outcome
    if "error" in outcome:
        assert isinstance(outcome["error"], str) and outcome["error"]
    else:
        assert _json_or_none(outcome["result"])


@settings(FUZZ, max_examples=400)
@given(
    name=st.sampled_from(sorted(SCHEMAS)),
    arguments=st.one_of(ARGUMENTS, st.dictionaries(KEY_TEXT, json_values(4), max_size=4)),
)
def test_the_engine_turns_any_tool_call_into_a_result_or_an_error(step_context, name, arguments):
    """Arguments reach call_tool as a JSON object: the agent loop refuses anything else from
    the LLM, and a tool node's args are an object in a validated spec."""
    tool = Tool.objects.get(name=name)
    started = time.monotonic()
    with transaction.atomic():
        outcome = step_context.call_tool(tool, arguments)
        _assert_outcome(outcome)
        call = ToolCall.objects.get(step=step_context.step, call_index=step_context._tool_index - 1)
        assert call.status == (ToolCall.FAILED if "error" in outcome else ToolCall.SUCCEEDED)
        ToolHealth.objects.all().delete()  # the breaker would short-cut later examples
        transaction.set_rollback(True)
    assert time.monotonic() - started < MAX_CALL_S


@settings(FUZZ, max_examples=300)
@given(
    schema=st.one_of(
        st.sampled_from(
            [
                *SCHEMAS.values(),
                {"type": "nonsense"},
                {"required": "to"},
                {"properties": {"x": {"pattern": "("}}},
                {"$ref": "#/$defs/missing"},
                {"items": {"$ref": "https://example.com/schema.json"}},
            ]
        ),
        st.dictionaries(
            st.sampled_from(
                ["type", "properties", "required", "items", "enum", "minimum", "$ref", "format"]
            ),
            json_values(4),
        ),
    ),
    arguments=json_values(6),
)
def test_checking_tool_arguments_never_raises(step_context, schema, arguments):
    """Tool.clean only checks that args_schema is an object, so an admin can save any JSON
    object there: a schema jsonschema refuses (or whose $ref points nowhere) must make the call
    an error for the agent, not crash the step."""
    tool = Tool(name="probe", entrypoint="baton.word_count", args_schema=schema)
    refusal = step_context._tool_refusal(tool, arguments)
    assert refusal is None or (isinstance(refusal, str) and refusal)


def test_a_result_json_cannot_hold_is_an_error_result(step_context):
    """`1e308 * 10` is inf; json.dumps writes Infinity, which no database's JSON column takes,
    so storing the result failed inside the engine instead of telling the agent."""
    tool = Tool.objects.get(name="calculator")
    with transaction.atomic():
        outcome = step_context.call_tool(tool, {"expression": "1e308 * 10"})
    assert "error" in outcome
    assert ToolCall.objects.get(step=step_context.step).status == ToolCall.FAILED
