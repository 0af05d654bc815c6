"""Run inputs: the engine's check, the start form, the editor's run panel and the CLI give a
clear error for any input, never an unhandled exception or a 500."""

import io
import json

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import transaction
from django.urls import reverse
from hypothesis import given, settings
from hypothesis import strategies as st

from runs.engine import RunInputError, validate_input
from runs.models import Run
from teams.spec import validate_spec
from tests.factories import make_agent, make_workflow
from tests.fuzz import DEEP_JSON, FORM_TEXT, FUZZ, TEXT, form_bodies, json_values

pytestmark = pytest.mark.django_db

# --- input schemas ----------------------------------------------------------------------------

PROPERTY_SCHEMAS = st.one_of(
    st.just({"type": "string"}),
    st.builds(lambda n: {"type": "string", "maxLength": n, "minLength": 1}, st.integers(0, 300)),
    st.just({"type": "string", "format": "email"}),
    st.just({"type": "string", "pattern": "^[a-z]+$"}),
    st.builds(
        lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi},
        st.integers(-10, 0),
        st.integers(0, 10**12),
    ),
    st.just({"type": "number", "exclusiveMinimum": 0}),
    st.just({"type": "boolean"}),
    st.just({"type": ["string", "null"]}),
    st.builds(lambda values: {"enum": values}, st.lists(json_values(3), min_size=1, max_size=4)),
    st.just({"type": "array", "items": {"type": "integer"}, "maxItems": 3}),
    st.just({"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}),
    st.just({"$ref": "#/$defs/topic"}),
    st.just({"$ref": "#/$defs/missing"}),
    st.just({"$ref": "https://example.com/schema.json"}),
    st.just({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    st.just({}),
)
NAMES = st.sampled_from(["topic", "count", "tags", "x", "a b", "ünï", "in-1", "__proto__"])


@st.composite
def input_schemas(draw) -> dict:
    properties = draw(st.dictionaries(NAMES, PROPERTY_SCHEMAS, max_size=4))
    schema = {
        "type": "object",
        "properties": properties,
        "$defs": {"topic": {"type": "string", "minLength": 2}},
    }
    if properties:
        schema["required"] = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


def spec_with(schema: dict) -> dict:
    return {"input_schema": schema, "nodes": [{"id": "gate", "kind": "approval"}], "edges": []}


@settings(FUZZ, max_examples=300)
@given(input_schemas(), st.one_of(json_values(), st.dictionaries(NAMES, json_values(4))))
def test_a_valid_spec_checks_any_input_with_a_clear_error(schema, data):
    """Once a spec passes the validator, starting it checks any input without crashing: the
    input comes back unchanged, or RunInputError says what is wrong with it."""
    spec = spec_with(schema)
    if validate_spec(spec):
        return
    try:
        assert validate_input(spec, data) is data
    except RunInputError as exc:
        assert exc.messages and all(isinstance(m, str) and m for m in exc.messages)


def test_a_dangling_ref_in_the_input_schema_is_a_clear_error():
    """A `$ref` that points nowhere passes the spec validator today, and then every start of
    that workflow crashes inside jsonschema (referencing.exceptions.Unresolvable)."""
    spec = spec_with({"type": "object", "properties": {"topic": {"$ref": "#/$defs/missing"}}})
    if validate_spec(spec):
        return  # refused when published: fine
    with pytest.raises(RunInputError):
        validate_input(spec, {"topic": "x"})


# --- size limits ------------------------------------------------------------------------------


def test_an_input_over_the_limit_is_refused_with_the_limit():
    limit = django_settings.BATON_MAX_INPUT_BYTES
    with pytest.raises(RunInputError) as info:
        validate_input(spec_with({"type": "object"}), {"topic": "x" * limit})
    assert f"the limit is {limit} bytes" in info.value.messages[0]


def test_an_input_just_under_the_limit_is_accepted():
    limit = django_settings.BATON_MAX_INPUT_BYTES
    data = {"topic": "x" * (limit - len('{"topic": ""}'))}
    assert validate_input(spec_with({"type": "object"}), data) is data


# --- the start form and the editor's run panel --------------------------------------------

FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 50},
        "count": {"type": "integer", "minimum": 1, "maximum": 10},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "mode": {"enum": ["fast", "slow"]},
        "level": {"enum": [1, 2, None]},
        "options": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "anything": {},
    },
    "required": ["topic"],
}
FIELDS = list(FORM_SCHEMA["properties"])


@pytest.fixture
def form_workflow(alice):
    make_agent("writer")
    spec = {
        "input_schema": FORM_SCHEMA,
        "nodes": [{"id": "write", "kind": "agent", "agent": "writer"}],
        "edges": [],
    }
    return make_workflow(spec, owner=alice, slug="form-fuzz")


def _undo():
    """Run the request in a savepoint that is rolled back: examples do not pile up runs."""
    return transaction.atomic()


@settings(FUZZ, max_examples=150)
@given(body=form_bodies([f"in-{name}" for name in FIELDS]))
def test_the_start_form_never_fails_on_any_post(client, alice, form_workflow, body):
    client.force_login(alice)
    with _undo():
        response = client.post("/runs/new/?workflow=form-fuzz", body)
        assert response.status_code in (200, 302), response.status_code
        if response.status_code == 302:
            assert Run.objects.filter(workflow=form_workflow).exists()
        transaction.set_rollback(True)


@settings(FUZZ, max_examples=150)
@given(query=form_bodies(["workflow", "version"]))
def test_the_start_page_never_fails_on_any_query(client, alice, form_workflow, query):
    client.force_login(alice)
    assert client.get("/runs/new/", query).status_code in (200, 404)


@settings(FUZZ, max_examples=150)
@given(body=form_bodies(["version", *(f"input-{name}" for name in FIELDS)]))
def test_the_editor_run_panel_never_fails_on_any_post(client, alice, form_workflow, body):
    client.force_login(alice)
    with _undo():
        response = client.post(reverse("runs:editor_run", args=["form-fuzz"]), body)
        assert response.status_code in (200, 404), response.status_code
        transaction.set_rollback(True)


@pytest.mark.parametrize(
    "path, field",
    [
        ("/runs/new/?workflow=form-fuzz", "in-options"),
        ("/runs/editor/form-fuzz/", "input-options"),
    ],
)
def test_json_nested_past_the_recursion_limit_is_a_form_error(
    client, alice, form_workflow, path, field
):
    """Django's forms.JSONField catches JSONDecodeError only; json.loads raises RecursionError
    on deep nesting, which became a 500."""
    client.force_login(alice)
    depth = 5000
    response = client.post(
        path, {"in-topic": "t", "input-topic": "t", field: "[" * depth + "]" * depth}
    )
    assert response.status_code in (200, 400)
    assert not Run.objects.exists()


# --- the command line -----------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(
    text=st.one_of(
        json_values().map(json.dumps),
        TEXT,
        FORM_TEXT,
        DEEP_JSON,
        st.dictionaries(st.sampled_from(FIELDS), json_values(4)).map(json.dumps),
    )
)
def test_run_workflow_refuses_bad_input_with_one_line_and_exit_2(form_workflow, text):
    out, err = io.StringIO(), io.StringIO()
    with _undo():
        try:
            call_command("run_workflow", "form-fuzz", input=text, stdout=out, stderr=err)
        except SystemExit as exit_info:
            assert exit_info.code == 2
            assert err.getvalue().startswith("error: ")
            assert err.getvalue().count("\n") == 1
        else:
            assert out.getvalue().startswith("run ")
        transaction.set_rollback(True)
