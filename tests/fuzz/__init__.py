"""Property-based tests: random and malformed input never crashes Baton.

Shared here: the hypothesis settings every fuzz test starts from, and the strategies for JSON
values, workflow specs (random and mutated valid ones) and HTTP form bodies. Each test sets its
own `max_examples` so that the whole fuzz suite (about 7,000 generated cases plus the examples
that once failed) runs in about a minute and a half on a busy 2-core machine.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

from django.conf import settings as django_settings
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from teams.gallery import CHILD_TEMPLATES, TEMPLATES
from teams.spec import CONDITION_OPS, EDGE_TRIGGERS, NODE_KINDS

# Failing examples are kept under var/ (git-ignored) so a rerun replays them first. The
# database, the client and the users are set up once per test, not once per example: the
# examples only read them or undo their writes, hence the function-scoped-fixture check is off.
FUZZ = settings(
    deadline=None,
    database=DirectoryBasedExampleDatabase(str(Path(django_settings.VAR_DIR) / "hypothesis")),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    print_blob=True,
)

# --- JSON -----------------------------------------------------------------------------------

# Text that breaks things: markup, template syntax, format strings, NUL, surrogates are left
# out (JSON cannot carry lone surrogates through Django's encoder), RTL marks, huge numbers.
NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\n",
        "{",
        "}",
        "{}",
        "{topic}",
        "{input}",
        "{a.b.c}",
        "{{7*7}}",
        "%s",
        "%(x)s",
        "${x}",
        "<script>",
        '"',
        "'",
        "\\",
        "\u202e",
        "ʼ",
        "²",
        "٣",
        "1e999",
        "-0",
        "NaN",
        "true",
        "null",
        "[]",
        '{"a": 1}',
        "../../etc/passwd",
        "a" * 300,
    ]
)
TEXT = st.one_of(st.text(max_size=40), NASTY_TEXT)
KEY_TEXT = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "_-. ", max_size=12), NASTY_TEXT
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)


def json_values(max_leaves: int = 20) -> st.SearchStrategy:
    """Any JSON document (objects, lists and scalars, nested)."""
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(KEY_TEXT, children, max_size=5),
        ),
        max_leaves=max_leaves,
    )


# --- workflow specs -------------------------------------------------------------------------

TOOL_SPEC = {
    "schema_version": 2,
    "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    "nodes": [
        {"id": "calc", "kind": "tool", "tool": "calculator", "args": {"expression": "{n} * 2"}},
        {"id": "check", "kind": "router"},
        {
            "id": "big",
            "kind": "agent",
            "agent": "writer",
            "prompt": "Big: {calc.result}",
            "output_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
        },
        {
            "id": "small",
            "kind": "approval",
            "title": "Small?",
            "due_in_s": 60,
            "default_outcome": "approve",
        },
    ],
    "edges": [
        {"source": "calc", "target": "check"},
        {
            "source": "check",
            "target": "big",
            "condition": {"path": "calc.result", "op": "gt", "value": 10},
        },
        {"source": "check", "target": "small", "default": True},
        {"source": "small", "target": "calc", "on": "rejected", "max_iterations": 2},
    ],
}


def _gallery_specs() -> list[dict]:
    specs = [TOOL_SPEC]
    for template in (*TEMPLATES.values(), *CHILD_TEMPLATES.values()):
        specs.append(
            template.spec(
                {name: name for name in template.agents},
                {local: local for local, _ in template.children},
            )
        )
    return specs


VALID_SPECS = _gallery_specs()

# Values a spec's own keys expect, so mutations often stay close to valid and reach deep code.
SPEC_WORDS = st.sampled_from(
    [
        *NODE_KINDS,
        *EDGE_TRIGGERS,
        *CONDITION_OPS,
        "id",
        "kind",
        "agent",
        "source",
        "target",
        "entry",
        "nodes",
        "edges",
        "input_schema",
        "default",
        "max_iterations",
        "condition",
        "pick",
        "synthesise",
        "fail",
        "continue",
        "approve",
        "reject",
        "writer",
        "researcher",
    ]
)
SPEC_VALUES = st.one_of(
    SPEC_WORDS,
    json_values(6),
    st.just({"type": "object"}),
    st.just({"type": "nonsense"}),
    st.just({"path": "a", "op": "eq", "value": 1}),
    st.lists(SPEC_WORDS, max_size=3),
    st.integers(min_value=-2, max_value=3),
).map(copy.deepcopy)  # a fresh object each time: a mutation must never make a cycle


def _containers(value, path=()):
    """Every (path, container) in a JSON value, the root included."""
    if isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from _containers(item, (*path, key))
    elif isinstance(value, list):
        yield path, value
        for index, item in enumerate(value):
            yield from _containers(item, (*path, index))


def mutate(draw, document, max_mutations: int = 4, values=SPEC_VALUES, keys=None):
    """A deep copy of a JSON document with a few random edits: values replaced, keys dropped
    or added, list items removed, added or duplicated."""
    document = copy.deepcopy(document)
    keys = keys or st.one_of(SPEC_WORDS, KEY_TEXT)
    for _ in range(draw(st.integers(min_value=1, max_value=max_mutations))):
        _, container = draw(st.sampled_from(list(_containers(document))))
        action = draw(st.sampled_from(["replace", "drop", "add", "duplicate"]))
        if isinstance(container, dict):
            names = list(container)
            if action == "add" or not names:
                container[draw(keys)] = draw(values)
            elif action == "drop":
                del container[draw(st.sampled_from(names))]
            else:
                container[draw(st.sampled_from(names))] = draw(values)
        else:
            if action == "add" or not container:
                container.insert(draw(st.integers(0, len(container))), draw(values))
            elif action == "drop":
                del container[draw(st.integers(0, len(container) - 1))]
            elif action == "duplicate":
                container.append(copy.deepcopy(draw(st.sampled_from(container))))
            else:
                container[draw(st.integers(0, len(container) - 1))] = draw(values)
    return document


@st.composite
def mutated_specs(draw, max_mutations: int = 4) -> dict:
    """A valid spec with a few random edits; most results are invalid in one precise way."""
    return mutate(draw, draw(st.sampled_from(VALID_SPECS)), max_mutations)


def random_specs() -> st.SearchStrategy:
    """Anything a client could send as a spec: JSON of any shape, spec-shaped dicts with wrong
    types in every slot, and mutated valid specs."""
    node = st.dictionaries(st.one_of(SPEC_WORDS, KEY_TEXT), SPEC_VALUES, max_size=6)
    spec_shaped = st.fixed_dictionaries(
        {},
        optional={
            "nodes": st.one_of(st.lists(st.one_of(node, SPEC_VALUES), max_size=5), SPEC_VALUES),
            "edges": st.one_of(st.lists(st.one_of(node, SPEC_VALUES), max_size=5), SPEC_VALUES),
            "input_schema": SPEC_VALUES,
            "state_schema": SPEC_VALUES,
            "entry": SPEC_VALUES,
            "schema_version": SPEC_VALUES,
        },
    )
    return st.one_of(json_values(), spec_shaped, mutated_specs())


# --- HTTP -----------------------------------------------------------------------------------

# JSON nested deeper than Python's recursion limit: json.loads raises RecursionError on it.
DEEP_JSON = st.integers(min_value=1000, max_value=3000).map(lambda n: "[" * n + "]" * n)
FORM_TEXT = st.one_of(
    TEXT,
    DEEP_JSON,
    json_values(8).map(json.dumps),
    st.integers().map(str),
    st.sampled_from(
        [
            "1",
            "0",
            "-1",
            "99999999999999999999999",
            "1" * 30,
            "²",
            "٣",
            "1.5",
            "2024-02-30",
            "2024-01-01",
            "9999-12-31",
            "0001-01-01",
            "draft",
            "approve",
            "reject",
            "csv",
            "newer",
            "older",
            "2024-01-01T00:00:00~1",
            "~",
            "x~99999999999999999999",
        ]
    ),
)


def form_bodies(names: list[str]) -> st.SearchStrategy:
    """Form data: some of `names` (the view's fields) and random other names, with one or
    several values each."""
    name = st.one_of(st.sampled_from(names), KEY_TEXT.filter(lambda s: "\x00" not in s))
    value = st.one_of(FORM_TEXT, st.lists(FORM_TEXT, min_size=1, max_size=3))
    return st.dictionaries(name, value, max_size=6)
