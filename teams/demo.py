"""The demo team that `make run` loads: roles, tools, agents and three published workflows.

Every agent uses the offline `scripted/baton` model, so the demo runs without an API key. The
`load_demo` command turns these definitions into rows; the specs follow teams/spec.py.
"""

from decimal import Decimal

from teams.spec import SCHEMA_VERSION

DEMO_MODEL = "scripted/baton"
# The note of every version `load_demo` publishes: how it recognises its own versions.
DEMO_NOTE = "Demo workflow (loaded by load_demo)"

ROLES = [
    {
        "name": "Researcher",
        "goal": "Find the facts that matter about a topic and cite where they come from.",
        "backstory": "A careful librarian who checks the notes before saying anything.",
    },
    {
        "name": "Analyst",
        "goal": "Turn facts into insight from one clearly stated angle.",
        "backstory": "Ten years of writing briefs for busy decision makers.",
    },
    {
        "name": "Writer",
        "goal": "Write short, clear reports that a reader can act on.",
        "backstory": "A former newspaper editor who hates jargon.",
    },
    {
        "name": "Synthesiser",
        "goal": "Merge several analyses into one balanced view and name where they disagree.",
        "backstory": "Chairs review panels and is known for fair summaries.",
    },
    {
        "name": "Editor",
        "goal": "Check drafts for accuracy, tone and length before they leave the team.",
        "backstory": "Reads every sentence twice.",
    },
]

TOOLS = [
    {
        "name": "calculator",
        "entrypoint": "baton.calculator",
        "description": "Evaluate an arithmetic expression (numbers and + - * / ** %).",
        "args_schema": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 2"}},
            "required": ["expression"],
        },
    },
    {
        "name": "word_count",
        "entrypoint": "baton.word_count",
        "description": "Count the words and characters of a text.",
        "args_schema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
    {
        "name": "search_notes",
        "entrypoint": "baton.search_notes",
        "description": "Search the team's offline knowledge base for notes about a query.",
        "args_schema": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look up."}},
            "required": ["query"],
        },
    },
    {
        "name": "publish_report",
        "entrypoint": "baton.publish_report",
        "description": "Publish a report to the team's report archive.",
        "side_effect": True,
        "args_schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
            "required": ["title", "body"],
        },
    },
    {
        "name": "send_email",
        "entrypoint": "baton.send_email",
        "description": "Send an email. A human approves every email before it is sent.",
        "side_effect": True,
        "requires_approval": True,
        "args_schema": {
            "type": "object",
            "properties": {
                "to": {"type": "string", "description": "Recipient address."},
                "subject": {"type": "string"},
                "body": {"type": "string"},
            },
            "required": ["to", "subject", "body"],
        },
    },
]

AGENTS = [
    {
        "name": "researcher",
        "role": "Researcher",
        "system_prompt": "You research topics. Use the search_notes tool, then list the key "
        "facts as short bullet points.",
        "tools": ["search_notes"],
    },
    {
        "name": "analyst",
        "role": "Analyst",
        "system_prompt": "You analyse findings from the angle you are given and say what they "
        "mean in three or four sentences.",
    },
    {
        "name": "writer",
        "role": "Writer",
        "system_prompt": "You write short, clear reports with a title and two paragraphs.",
        "temperature": 0.5,
    },
    {
        "name": "synthesiser",
        "role": "Synthesiser",
        "system_prompt": "You merge several analyses into one view and point out where they "
        "disagree.",
    },
    {
        "name": "editor",
        "role": "Editor",
        "system_prompt": "You edit drafts: fix mistakes, cut jargon and keep the author's voice.",
    },
]

_TOPIC_INPUT = {
    "type": "object",
    "properties": {"topic": {"type": "string", "minLength": 1, "description": "What to study."}},
    "required": ["topic"],
}

PIPELINE_SPEC = {
    "schema_version": SCHEMA_VERSION,
    "input_schema": _TOPIC_INPUT,
    "nodes": [
        {
            "id": "research",
            "kind": "agent",
            "agent": "researcher",
            "label": "Research",
            "prompt": "Research {topic}. Look it up in the notes and list the key facts.",
        },
        {
            "id": "analysis",
            "kind": "agent",
            "agent": "analyst",
            "label": "Analyse",
            "prompt": "Analyse these findings about {topic} and say what they mean:\n\n{research}",
        },
        {
            "id": "report",
            "kind": "agent",
            "agent": "writer",
            "label": "Write the report",
            "prompt": "Write a short report on {topic} based on this analysis:\n\n{analysis}",
        },
    ],
    "edges": [
        {"source": "research", "target": "analysis"},
        {"source": "analysis", "target": "report"},
    ],
}

_ANGLES = [
    ("market", "Market", "the market: who wants it, who pays for it and how that is changing"),
    ("technical", "Technical", "the technology: how it works and what limits it"),
    ("risks", "Risks", "the risks: what could go wrong and how likely that is"),
]

FANOUT_SPEC = {
    "schema_version": SCHEMA_VERSION,
    "input_schema": _TOPIC_INPUT,
    "nodes": [
        {"id": "fan_out", "kind": "parallel", "label": "Three angles at once"},
        *[
            {
                "id": node_id,
                "kind": "agent",
                "agent": "analyst",
                "label": f"{label} angle",
                "prompt": f"Analyse {{topic}} from the angle of {angle}.",
            }
            for node_id, label, angle in _ANGLES
        ],
        {"id": "gather", "kind": "join", "label": "Gather the analyses"},
        {
            "id": "synthesis",
            "kind": "agent",
            "agent": "synthesiser",
            "label": "Synthesise",
            "prompt": "Merge these three analyses of {topic} into one view.\n\n"
            "Market:\n{market}\n\nTechnical:\n{technical}\n\nRisks:\n{risks}",
        },
    ],
    "edges": [
        *[{"source": "fan_out", "target": node_id} for node_id, _, _ in _ANGLES],
        *[{"source": node_id, "target": "gather"} for node_id, _, _ in _ANGLES],
        {"source": "gather", "target": "synthesis"},
    ],
}

APPROVAL_SPEC = {
    "schema_version": SCHEMA_VERSION,
    "input_schema": _TOPIC_INPUT,
    "nodes": [
        {
            "id": "draft",
            "kind": "agent",
            "agent": "writer",
            "label": "Draft the report",
            "prompt": "Write a short report on {topic} for the team.",
        },
        {
            # send_email requires approval: a human sees these arguments and decides first.
            "id": "email",
            "kind": "tool",
            "tool": "send_email",
            "label": "Email the team",
            "args": {
                "to": "team@example.com",
                "subject": "Report on {topic}",
                "body": "{draft}",
            },
        },
        {
            "id": "publish",
            "kind": "tool",
            "tool": "publish_report",
            "label": "Publish",
            "args": {"title": "Report on {topic}", "body": "{draft}"},
        },
    ],
    "edges": [
        {"source": "draft", "target": "email"},
        {"source": "email", "target": "publish"},
    ],
}

_BUDGETS = {
    "max_cost_per_run": Decimal("0.50"),
    "max_tokens_per_run": 50_000,
    "max_tokens_per_step": 8_000,
    "max_steps_per_run": 50,
    "max_wall_s": 900,
    "budget_policy": "stop",
}

WORKFLOWS = [
    {
        "slug": "demo-pipeline",
        "name": "Demo: research pipeline",
        "description": "A researcher looks the topic up, an analyst interprets the findings and "
        "a writer turns them into a short report.",
        "spec": PIPELINE_SPEC,
        **_BUDGETS,
    },
    {
        "slug": "demo-fanout",
        "name": "Demo: three angles in parallel",
        "description": "Three analysts study the topic from different angles at the same time; a "
        "synthesiser merges their views.",
        "spec": FANOUT_SPEC,
        **_BUDGETS,
    },
    {
        "slug": "demo-approval",
        "name": "Demo: report with approval",
        "description": "A writer drafts a report; emailing it to the team waits for a human's "
        "approval, then the report is published.",
        "spec": APPROVAL_SPEC,
        **_BUDGETS,
    },
]
