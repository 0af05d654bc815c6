"""The templates gallery: ready-made workflows, one per orchestration pattern.

Each template creates the agents it needs (on the offline `scripted/baton` model, named after the
new workflow so they never collide with anyone's) and a workflow with a published version that
runs as-is. The specs follow the format at the top of teams/spec.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import IntegrityError, transaction

from teams.models import Agent, Role, Workflow
from teams.spec import SCHEMA_VERSION, validate_spec
from teams.yaml_io import unique_name, unique_slug

MODEL = "scripted/baton"

TOPIC_INPUT = {
    "type": "object",
    "properties": {"topic": {"type": "string", "minLength": 1, "description": "What to work on."}},
    "required": ["topic"],
}

# The roles templates use: (name, goal, backstory). Reused when an identical role exists.
ROLES = {
    "researcher": (
        "Researcher",
        "Find the facts that matter about a topic.",
        "A careful librarian who checks sources before saying anything.",
    ),
    "writer": (
        "Writer",
        "Write short, clear texts a reader can act on.",
        "A former newspaper editor who hates jargon.",
    ),
    "analyst": (
        "Analyst",
        "Turn facts into insight from one clearly stated angle.",
        "Ten years of writing briefs for busy decision makers.",
    ),
    "synthesiser": (
        "Synthesiser",
        "Merge several views into one balanced answer.",
        "Chairs review panels and is known for fair summaries.",
    ),
    "lead": (
        "Team lead",
        "Split the work between the team and decide when it is done.",
        "Has run many small teams and delegates well.",
    ),
    "debater": (
        "Debater",
        "Argue for the best answer and critique weak reasoning.",
        "A trained debater who changes their mind when the evidence says so.",
    ),
    "judge": (
        "Judge",
        "Weigh the answers in front of you and give a fair final decision.",
        "A retired judge who explains every verdict.",
    ),
    "editor": (
        "Editor",
        "Check drafts for accuracy, tone and length.",
        "Reads every sentence twice.",
    ),
}


@dataclass(frozen=True)
class Template:
    key: str
    title: str
    description: str
    # The agents to create: local name -> role key (see ROLES) and a system prompt.
    agents: dict[str, tuple[str, str]]
    # Builds the spec from {local name: real agent name} and the sub-workflow slugs created.
    spec: Callable[[dict[str, str], dict[str, str]], dict]
    # Sub-workflows created alongside: local name -> template key of the child.
    children: tuple[tuple[str, str], ...] = ()


def _spec(nodes: list[dict], edges: list[dict], input_schema: dict | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "input_schema": input_schema or TOPIC_INPUT,
        "nodes": nodes,
        "edges": edges,
    }


def _chain(*ids: str) -> list[dict]:
    return [{"source": a, "target": b} for a, b in zip(ids, ids[1:], strict=False)]


def _pipeline(a: dict[str, str], _children: dict[str, str]) -> dict:
    return _spec(
        [
            {
                "id": "research",
                "kind": "agent",
                "agent": a["researcher"],
                "label": "Research",
                "prompt": "Research {topic} and list the key facts as short bullet points.",
            },
            {
                "id": "analyse",
                "kind": "agent",
                "agent": a["analyst"],
                "label": "Analyse",
                "prompt": "Say what these findings about {topic} mean:\n\n{research}",
            },
            {
                "id": "write",
                "kind": "agent",
                "agent": a["writer"],
                "label": "Write",
                "prompt": "Write a short report on {topic} from this analysis:\n\n{analyse}",
            },
        ],
        _chain("research", "analyse", "write"),
    )


_ANGLES = (
    ("optimist", "what could go right"),
    ("sceptic", "what could go wrong"),
    ("pragmatist", "what to do first"),
)


def _fanout(a: dict[str, str], _children: dict[str, str]) -> dict:
    branches = [
        {
            "id": key,
            "kind": "agent",
            "agent": a["analyst"],
            "label": key.capitalize(),
            "prompt": f"Analyse {{topic}} from one angle only: {angle}.",
        }
        for key, angle in _ANGLES
    ]
    return _spec(
        [
            {"id": "fan_out", "kind": "parallel", "label": "Three angles at once"},
            *branches,
            {"id": "gather", "kind": "join", "label": "Gather"},
            {
                "id": "synthesis",
                "kind": "agent",
                "agent": a["synthesiser"],
                "label": "Synthesise",
                "prompt": "Merge these analyses of {topic} into one view:\n\n"
                + "\n\n".join(f"{key.capitalize()}:\n{{{key}}}" for key, _ in _ANGLES),
            },
        ],
        [
            *[{"source": "fan_out", "target": key} for key, _ in _ANGLES],
            *[{"source": key, "target": "gather"} for key, _ in _ANGLES],
            {"source": "gather", "target": "synthesis"},
        ],
    )


def _router(a: dict[str, str], _children: dict[str, str]) -> dict:
    schema = {
        "type": "object",
        "properties": {
            "topic": TOPIC_INPUT["properties"]["topic"],
            "depth": {
                "type": "string",
                "enum": ["quick", "deep"],
                "description": "deep: a researched report; quick (default): a short answer.",
            },
        },
        "required": ["topic"],
    }
    return _spec(
        [
            {"id": "triage", "kind": "router", "label": "Quick or deep?"},
            {
                "id": "deep_dive",
                "kind": "agent",
                "agent": a["researcher"],
                "label": "Deep dive",
                "prompt": "Research {topic} thoroughly and write a structured report.",
            },
            {
                "id": "quick_answer",
                "kind": "agent",
                "agent": a["writer"],
                "label": "Quick answer",
                "prompt": "Answer in three sentences: what should a newcomer know about {topic}?",
            },
        ],
        [
            {
                "source": "triage",
                "target": "deep_dive",
                "label": "deep",
                "condition": {"path": "depth", "op": "eq", "value": "deep"},
            },
            {"source": "triage", "target": "quick_answer", "label": "quick", "default": True},
        ],
        schema,
    )


def _supervisor(a: dict[str, str], _children: dict[str, str]) -> dict:
    return _spec(
        [
            {
                "id": "team",
                "kind": "supervisor",
                "label": "Team lead",
                "agent": a["lead"],
                "workers": [a["researcher"], a["writer"]],
                "max_turns": 4,
                "prompt": "Produce a short, well-researched report on {topic}: get the facts "
                "first, then the writing.",
            },
        ],
        [],
    )


def _debate(a: dict[str, str], _children: dict[str, str]) -> dict:
    return _spec(
        [
            {
                "id": "debate",
                "kind": "debate",
                "label": "Debate",
                "agents": [a["pro"], a["con"]],
                "judge": a["judge"],
                "max_rounds": 3,
                "summarise_after_tokens": 1500,
                "prompt": "What is the best way to approach {topic}?",
            },
        ],
        [],
    )


def _vote(a: dict[str, str], _children: dict[str, str]) -> dict:
    return _spec(
        [
            {
                "id": "vote",
                "kind": "vote",
                "label": "Vote",
                "agents": [a["first"], a["second"], a["third"]],
                "judge": a["judge"],
                "mode": "pick",
                "prompt": "Give your best one-paragraph answer: what matters most about {topic}?",
            },
        ],
        [],
    )


def _hierarchical(a: dict[str, str], children: dict[str, str]) -> dict:
    return _spec(
        [
            {
                "id": "plan",
                "kind": "agent",
                "agent": a["lead"],
                "label": "Plan",
                "prompt": "Write a three-point plan for a report on {topic}.",
            },
            {
                "id": "delegate",
                "kind": "subworkflow",
                "label": "Research team",
                "workflow": children["team"],
                "input": {"topic": "{topic}", "brief": "{plan}"},
            },
            {
                "id": "review",
                "kind": "agent",
                "agent": a["editor"],
                "label": "Review",
                "prompt": "Review this report on {topic} against the plan and give the final "
                "version.\n\nPlan:\n{plan}\n\nReport:\n{delegate}",
            },
        ],
        _chain("plan", "delegate", "review"),
    )


def _child_team(a: dict[str, str], _children: dict[str, str]) -> dict:
    schema = {
        "type": "object",
        "properties": {
            "topic": TOPIC_INPUT["properties"]["topic"],
            "brief": {"type": "string", "description": "What the parent asks for."},
        },
        "required": ["topic"],
    }
    return _spec(
        [
            {
                "id": "research",
                "kind": "agent",
                "agent": a["researcher"],
                "label": "Research",
                "prompt": "Research {topic} following this brief:\n\n{brief}",
            },
            {
                "id": "write",
                "kind": "agent",
                "agent": a["writer"],
                "label": "Write",
                "prompt": "Write a short report on {topic} from these findings:\n\n{research}",
            },
        ],
        _chain("research", "write"),
        schema,
    )


def _approval(a: dict[str, str], _children: dict[str, str]) -> dict:
    return _spec(
        [
            {
                "id": "draft",
                "kind": "agent",
                "agent": a["writer"],
                "label": "Draft",
                "prompt": "Write a short announcement about {topic}.",
            },
            {
                "id": "approve",
                "kind": "approval",
                "label": "Human approval",
                "title": "Approve the announcement",
                "prompt": "{draft}",
                "due_in_s": 86400,
                "default_outcome": "reject",
            },
            {
                "id": "finalise",
                "kind": "agent",
                "agent": a["editor"],
                "label": "Finalise",
                "prompt": "Polish this approved announcement about {topic}:\n\n{draft}",
            },
            {
                "id": "revise",
                "kind": "agent",
                "agent": a["writer"],
                "label": "Revise",
                "prompt": "The announcement about {topic} was rejected. Rewrite it more "
                "carefully:\n\n{draft}",
            },
        ],
        [
            {"source": "draft", "target": "approve"},
            {"source": "approve", "target": "finalise"},
            {"source": "approve", "target": "revise", "on": "rejected"},
        ],
    )


TEMPLATES: dict[str, Template] = {
    t.key: t
    for t in (
        Template(
            "pipeline",
            "Sequential pipeline",
            "Agents one after another: a researcher finds facts, an analyst interprets them, a "
            "writer turns them into a report. Each step sees the earlier outputs.",
            {
                "researcher": ("researcher", "List facts as short bullet points."),
                "analyst": ("analyst", "Explain what findings mean in a few sentences."),
                "writer": ("writer", "Write a title and two short paragraphs."),
            },
            _pipeline,
        ),
        Template(
            "fanout",
            "Parallel fan-out / fan-in",
            "One input fanned out to three analysts who work at the same time, then joined and "
            "merged by a synthesiser.",
            {
                "analyst": ("analyst", "Analyse from the single angle you are given."),
                "synthesiser": ("synthesiser", "Merge the analyses and name where they disagree."),
            },
            _fanout,
        ),
        Template(
            "router",
            "Router",
            "A rule on the input picks the path: `depth: deep` goes to a researcher for a full "
            "report, anything else (the default edge) to a writer for a quick answer.",
            {
                "researcher": ("researcher", "Write structured, researched reports."),
                "writer": ("writer", "Answer briefly and plainly."),
            },
            _router,
        ),
        Template(
            "supervisor",
            "Supervisor with workers",
            "A team lead decides, turn by turn, which worker acts next (a researcher or a "
            "writer) and when the job is done.",
            {
                "lead": ("lead", "Delegate one step at a time; finish when the report is ready."),
                "researcher": ("researcher", "Find the facts the lead asks for."),
                "writer": ("writer", "Write what the lead asks for from the work so far."),
            },
            _supervisor,
        ),
        Template(
            "debate",
            "Debate with a judge",
            "Two agents take turns critiquing each other's answer until they agree or the round "
            "limit is reached; a judge gives the final answer.",
            {
                "pro": ("debater", "Argue for bold, ambitious approaches."),
                "con": ("debater", "Argue for careful, low-risk approaches."),
                "judge": ("judge", "Decide on the strongest answer and explain why."),
            },
            _debate,
        ),
        Template(
            "vote",
            "Vote with a judge",
            "Three agents answer the same question independently; a judge picks the best "
            "answer. Disagreement between them is recorded.",
            {
                "first": ("analyst", "Answer from the point of view of a practitioner."),
                "second": ("analyst", "Answer from the point of view of a researcher."),
                "third": ("analyst", "Answer from the point of view of a newcomer."),
                "judge": ("judge", "Pick the answer that is most accurate and useful."),
            },
            _vote,
        ),
        Template(
            "hierarchical",
            "Hierarchical team (sub-workflow)",
            "A lead plans, hands the work to a research team that is its own workflow (created "
            "alongside, run as a child run), and an editor reviews the result.",
            {
                "lead": ("lead", "Write short, concrete plans."),
                "editor": ("editor", "Check the report against the plan and fix what is off."),
            },
            _hierarchical,
            children=(("team", "hierarchical-team"),),
        ),
        Template(
            "approval",
            "Human approval gate",
            "A writer drafts an announcement; a person approves it before it is finalised. A "
            "rejection sends it back for a rewrite.",
            {
                "writer": ("writer", "Write short announcements."),
                "editor": ("editor", "Polish approved texts without changing their meaning."),
            },
            _approval,
        ),
    )
}

# Workflows a template creates alongside itself; not offered in the gallery on their own.
CHILD_TEMPLATES: dict[str, Template] = {
    "hierarchical-team": Template(
        "hierarchical-team",
        "Research team (sub-workflow)",
        "A researcher and a writer produce a report on the topic, following the parent's brief.",
        {
            "researcher": ("researcher", "Follow the brief; list facts as bullet points."),
            "writer": ("writer", "Write a title and two short paragraphs."),
        },
        _child_team,
    ),
}


def auto_layout(spec: dict) -> dict:
    """Canvas positions ({node_id: {x, y}}, the editor's layout format): left to right by
    distance from the entry node, one row per node at the same distance."""
    outgoing: dict[str, list[str]] = {}
    for edge in spec.get("edges", []):
        outgoing.setdefault(edge["source"], []).append(edge["target"])
    ids = [node["id"] for node in spec.get("nodes", [])]
    if not ids:
        return {}
    depth = {ids[0]: 0}
    queue = [ids[0]]
    while queue:
        current = queue.pop(0)
        for target in outgoing.get(current, []):
            if target not in depth:
                depth[target] = depth[current] + 1
                queue.append(target)
    rows: dict[int, int] = {}
    layout = {}
    for node_id in ids:
        column = depth.get(node_id, max(depth.values()) + 1)
        row = rows.get(column, 0)
        rows[column] = row + 1
        layout[node_id] = {"x": float(80 + 240 * column), "y": float(80 + 140 * row)}
    return layout


def _role(key: str) -> Role:
    name, goal, backstory = ROLES[key]
    existing = Role.objects.filter(name=name, goal=goal, backstory=backstory).first()
    if existing:
        return existing
    return Role.objects.create(name=unique_name(Role, name), goal=goal, backstory=backstory)


def _create(template: Template, name: str, slug: str, owner, note: str) -> Workflow:
    children = {
        local: _create(
            CHILD_TEMPLATES[child_key],
            f"{name}: {CHILD_TEMPLATES[child_key].title}",
            unique_slug(f"{slug}-{local}"),
            owner,
            note,
        ).slug
        for local, child_key in template.children
    }
    agents = {}
    for local, (role_key, prompt) in template.agents.items():
        agent = Agent.objects.create(
            name=unique_name(Agent, f"{slug}-{local}"),
            role=_role(role_key),
            model=MODEL,
            system_prompt=prompt,
        )
        agents[local] = agent.name
    spec = template.spec(agents, children)
    problems = validate_spec(
        spec,
        known_agents=set(agents.values()),
        known_workflows=set(children.values()),
        known_tools=set(),
    )
    if problems:  # a broken template is a bug in this module, not the user's input
        raise AssertionError(f"template {template.key} is invalid: {problems}")
    workflow = Workflow.objects.create(
        name=name,
        slug=slug,
        description=template.description,
        owner=owner,
        draft=spec,
        layout=auto_layout(spec),
    )
    workflow.publish(user=owner, note=note)
    return workflow


def check_slug(slug: str) -> None:
    """Raise ValidationError when `slug` cannot name a new workflow."""
    validate_slug(slug)
    if Workflow.objects.filter(slug=slug).exists():
        raise ValidationError(f"A workflow with the slug '{slug}' already exists.")


def create_from_template(key: str, *, name: str, slug: str, owner=None) -> Workflow:
    """Create the template's agents, any sub-workflow and the workflow, with a published version.

    Raises KeyError for an unknown template and ValidationError for a slug that is taken.
    """
    template = TEMPLATES[key]
    try:
        with transaction.atomic():
            check_slug(slug)
            return _create(
                template, name, slug, owner, f"Created from the {template.title} template"
            )
    except IntegrityError:  # someone took the slug between the check and the insert
        raise ValidationError(f"A workflow with the slug '{slug}' already exists.") from None
