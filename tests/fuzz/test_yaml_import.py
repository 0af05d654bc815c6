"""Imported YAML (Baton exports and CrewAI projects), as random bytes, random YAML and mutated
real files: an import either works (possibly listing problems) or fails with ImportFailed and
one clear sentence; never another exception, never a 500 from the import page."""

from pathlib import Path

import pytest
import yaml
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from hypothesis import example, given, settings
from hypothesis import strategies as st

from teams.crewai import import_crewai, import_crewai_documents
from teams.yaml_io import MAX_IMPORT_BYTES, ImportFailed, ImportResult, import_yaml, load_yaml
from tests.factories import make_tool
from tests.fuzz import FUZZ, KEY_TEXT, SPEC_VALUES, TEXT, json_values, mutate

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).resolve().parent.parent / "teams" / "fixtures"
EXPORT = yaml.safe_load((FIXTURES / "baton_v1_export.yaml").read_text())
CREW_AGENTS = yaml.safe_load((FIXTURES / "crewai_latest_ai" / "agents.yaml").read_text())
CREW_TASKS = yaml.safe_load((FIXTURES / "crewai_latest_ai" / "tasks.yaml").read_text())

# YAML's own ways to surprise a loader: tags, anchors, timestamps, huge numbers, escapes.
YAML_SNIPPETS = st.sampled_from(
    [
        "x: " + "1" * 5000,
        "x: 0x" + "f" * 5000,
        "x: !!int 1e5",
        "x: !!float nan",
        "x: .inf",
        "x: 2024-02-30",
        "x: 2001-12-14t21:59:43.10-25:00",
        "x: 9999-12-31t25:00:00Z",
        "x: 190:20:30",
        "x: !!binary xx",
        "x: !!python/object/apply:os.system ['true']",
        "x: !!set {a, b}",
        "x: !!omap [a: 1]",
        "? [a, b]\n: 1",
        "&a [*a]",
        "a: &a [1, 2]\nb: [*a, *a, *a]",
        'x: "\\ud800"',
        'x: "\\x00"',
        'x: "\\U0010ffff"',
        "<<: {a: 1}\nb: 2",
        "x: |\n  text\n bad indent",
        "%YAML 1.1\n---\nx: 1",
        "--- 1\n--- 2",
        "[" * 1100,
        "x: @",
        "\t- tab",
        'baton_export: 1\nworkflow: {name: "\\ud800", draft: {}}',
        'baton_export: 1\nworkflow: {name: "a\\x00b", slug: x, draft: {}}',
    ]
)
YAML_TEXT = st.one_of(
    YAML_SNIPPETS,
    st.lists(YAML_SNIPPETS, min_size=2, max_size=4).map("\n".join),
    json_values().map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    TEXT,
)
YAML_BYTES = st.one_of(
    st.binary(max_size=200),
    YAML_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.just(b"\xef\xbb\xbf" + b"x: 1"),
    st.just(b"\xff\xfe" + "x: 1".encode("utf-16-le")),
)

EXPORT_VALUES = st.one_of(
    SPEC_VALUES,
    st.sampled_from(["baton.calculator", "scripted/baton", "researcher", "0.50", "-1", 10**30]),
)


def _expect_import(call) -> None:
    """Run an import in a savepoint that is rolled back; it either works or says why not."""
    with transaction.atomic():
        try:
            result = call()
        except ImportFailed as exc:
            assert str(exc) and "Traceback" not in str(exc)
        else:
            assert isinstance(result, ImportResult) and result.workflow is not None
            assert all(isinstance(p, str) and p for p in result.problems)
        transaction.set_rollback(True)


@settings(FUZZ, max_examples=300)
@given(YAML_BYTES)
@example(b"x: " + b"1" * 5000)
@example(b"x: 2024-02-30")
@example(b"x: !!int 1e5")
def test_loading_any_bytes_gives_plain_data_or_a_clear_refusal(data):
    try:
        load_yaml(data)
    except ImportFailed as exc:
        assert str(exc)


@pytest.fixture
def calculator(db):
    return make_tool("calculator")


@settings(FUZZ, max_examples=250)
@given(random=st.one_of(st.none(), json_values()), trusted=st.booleans(), data=st.data())
def test_importing_a_mutated_export_works_or_fails_clearly(
    alice, calculator, random, trusted, data
):
    """Mostly a real export with a few edits; sometimes any JSON at all."""
    if random is None or data.draw(st.integers(0, 3)):
        document = mutate(data.draw, EXPORT, 5, values=EXPORT_VALUES)
    else:
        document = random
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    _expect_import(lambda: import_yaml(text.encode(), owner=alice, trusted=trusted))


@settings(FUZZ, max_examples=150)
@given(YAML_BYTES, st.booleans())
@example(b'baton_export: 1\nworkflow: {name: "\\ud800", draft: {}}', True)
def test_importing_any_bytes_as_an_export_works_or_fails_clearly(alice, data, trusted):
    _expect_import(lambda: import_yaml(data, owner=alice, trusted=trusted))


def test_text_that_a_database_cannot_store_is_refused_clearly(alice):
    """A YAML escape can make a lone surrogate (no UTF-8 form: SQLite's driver raises
    UnicodeEncodeError) or a NUL character (PostgreSQL refuses it in text)."""
    for text in ('"\\ud800"', '"a\\x00b"'):
        document = f"baton_export: 1\nworkflow: {{name: {text}, slug: wf, draft: {{}}}}\n"
        with pytest.raises(ImportFailed):
            import_yaml(document.encode(), owner=alice)


@settings(FUZZ, max_examples=250)
@given(
    data=st.data(),
    hierarchical=st.sampled_from([None, True, False]),
    name=st.one_of(st.just(""), TEXT),
)
def test_importing_a_mutated_crewai_project_works_or_fails_clearly(
    alice, calculator, data, hierarchical, name
):
    keys = st.one_of(
        st.sampled_from(
            [
                "role",
                "goal",
                "backstory",
                "llm",
                "tools",
                "agent",
                "context",
                "description",
                "expected_output",
                "human_input",
                "output_json",
                "max_iter",
            ]
        ),
        KEY_TEXT,
    )
    values = st.one_of(
        EXPORT_VALUES,
        st.sampled_from(list(CREW_AGENTS) + list(CREW_TASKS)),
        st.lists(st.sampled_from(list(CREW_TASKS)), max_size=2),
    )
    agents = mutate(data.draw, CREW_AGENTS, 3, values=values, keys=keys)
    tasks = mutate(data.draw, CREW_TASKS, 3, values=values, keys=keys)
    _expect_import(
        lambda: import_crewai_documents(
            agents, tasks, hierarchical=hierarchical, owner=alice, name=name
        )
    )


@settings(FUZZ, max_examples=120)
@given(YAML_BYTES, YAML_BYTES)
def test_importing_any_bytes_as_a_crewai_project_works_or_fails_clearly(alice, agents, tasks):
    _expect_import(lambda: import_crewai(agents, tasks, owner=alice))


def test_a_file_over_the_limit_is_refused_with_the_limit(alice):
    with pytest.raises(ImportFailed) as info:
        load_yaml(b"x: 1\n" + b"#" * MAX_IMPORT_BYTES)
    assert f"the limit is {MAX_IMPORT_BYTES:,} bytes" in str(info.value)


# --- through the import page ------------------------------------------------------------------


@st.composite
def mutated_export_files(draw) -> bytes:
    return yaml.safe_dump(mutate(draw, EXPORT, 3, values=EXPORT_VALUES)).encode()


@settings(FUZZ, max_examples=80)
@given(st.one_of(YAML_BYTES, mutated_export_files()))
def test_the_import_page_never_fails_on_any_file(client, alice, data):
    client.force_login(alice)
    with transaction.atomic():
        response = client.post("/workflows/import/", {"file": SimpleUploadedFile("x.yaml", data)})
        assert response.status_code in (200, 302, 400)
        transaction.set_rollback(True)


def test_the_import_page_refuses_a_file_over_the_limit_with_the_limit(client, alice):
    client.force_login(alice)
    big = SimpleUploadedFile("big.yaml", b"x: 1\n" + b"#" * MAX_IMPORT_BYTES)
    response = client.post("/workflows/import/", {"file": big})
    assert response.status_code == 400
    assert "the limit is 1,048,576 bytes" in response.content.decode()
