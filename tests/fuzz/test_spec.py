"""The spec validator and upgrader take anything a client can send and never raise."""

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from teams.spec import Problem, agents_used, upgrade_spec, validate_spec
from tests.fuzz import FUZZ, VALID_SPECS, json_values, mutated_specs, random_specs

KNOWN = {
    "known_agents": {
        "writer",
        "researcher",
        "analyst",
        "judge",
        "critic",
        "optimist",
        "supervisor",
        "worker",
        "triage",
    },
    "known_tools": {"calculator"},
    "known_workflows": {"child"},
}


def _assert_problems(result) -> None:
    assert isinstance(result, list)
    for problem in result:
        assert isinstance(problem, Problem)
        assert str(problem) and isinstance(problem.as_dict(), dict)


def test_the_valid_specs_the_mutations_start_from_are_valid():
    for spec in VALID_SPECS:
        assert validate_spec(spec) == []


@settings(FUZZ, max_examples=700)
@given(random_specs())
def test_validate_spec_returns_problems_for_anything(spec):
    before = copy.deepcopy(spec)
    _assert_problems(validate_spec(spec))
    _assert_problems(validate_spec(spec, **KNOWN))
    assert spec == before, "the validator must not change what it checks"


@settings(FUZZ, max_examples=800)
@given(mutated_specs())
def test_a_mutated_spec_is_either_valid_or_explained(spec):
    problems = validate_spec(spec, **KNOWN)
    _assert_problems(problems)
    if not problems:
        # A spec the validator passes is one the engine can start: it has an entry node.
        ids = [n["id"] for n in spec["nodes"]]
        assert spec.get("entry", ids[0]) in ids


@settings(FUZZ, max_examples=500)
@given(
    st.one_of(random_specs(), json_values()),
    st.one_of(st.none(), st.integers(min_value=-1, max_value=3)),
)
def test_upgrading_anything_never_raises_and_gives_a_current_spec(spec, from_version):
    before = copy.deepcopy(spec)
    upgraded = upgrade_spec(spec, from_version=from_version)
    assert spec == before, "upgrade_spec must not change its argument"
    if isinstance(spec, dict):
        assert upgraded["schema_version"] == 2
        _assert_problems(validate_spec(upgraded))


@settings(FUZZ, max_examples=300)
@given(random_specs())
def test_listing_a_drafts_agents_never_raises(spec):
    """Export and the editor list the agents of drafts, which may be invalid."""
    if isinstance(spec, dict):
        assert isinstance(agents_used(spec), set)
