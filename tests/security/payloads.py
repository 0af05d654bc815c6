"""Untrusted text for security tests, and a builder that puts one text in every place Baton
shows text it did not write: names, descriptions, node ids, prompts, run input, agent output,
tool arguments and results, approval titles and payloads, error messages, cost labels.

`build_world` makes the objects the way the engine leaves them (rows, and events through
runs.events), so the pages render them as they would after a real run. A text longer than a
column holds is cut to the column's max_length (PostgreSQL refuses more; SQLite would keep it):
the label comes first and the text right after it, so what is kept starts with a whole payload.
Tests that need every payload whole in every column build one world per payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.db import models, transaction
from django.utils import timezone

from approvals.models import ApprovalRequest
from runs import costs, events, hooks
from runs.models import Run, Step, ToolCall, UsageRecord
from teams.models import Agent, Role, Tool, Workflow, WorkflowVersion

# Each one sets window.__xss (or opens a dialog) if it ever runs in a page.
XSS_PAYLOADS = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1">',
    "<svg onload=window.__xss=1></svg>",
    "<svg><script>window.__xss=1</script></svg>",
    '<svg><a xlink:href="javascript:window.__xss=1"><text y="20">svg link</text></a></svg>',
    '<a href="javascript:window.__xss=1" id="xss-link">click me</a>',
    "[markdown link](javascript:window.__xss=1)",
    "![markdown image](x onerror=window.__xss=1)",
    '<iframe srcdoc="<script>parent.__xss=1</script>"></iframe>',
    '<details open ontoggle="window.__xss=1">',
    '" onmouseover="window.__xss=1" autofocus onfocus="window.__xss=1" x="',
    "' onmouseover='window.__xss=1' x='",
    "</textarea><script>window.__xss=1</script>",
    "</script><script>window.__xss=1</script>",
    '<div hx-get="/" hx-trigger="load" hx-on::after-request="window.__xss=1">htmx</div>',
    "<style>@import 'javascript:window.__xss=1'</style>",
    "{{7*7}} {% now 'Y' %} ${7*7} #{7*7}",
    "<script>alert(1)</script>",
]
# One text holding them all, for places that show a single value.
COMBINED = "\n\n".join(XSS_PAYLOADS)
# Markdown with raw HTML and links, for places rendered as Markdown (agent output, results).
MARKDOWN = (
    "# Report\n\nA [safe link](https://example.com) and a [bad one](javascript:window.__xss=1)."
    '\n\n<script>window.__xss=1</script>\n\n<img src=x onerror="window.__xss=1">\n\n'
    '<a href="javascript:window.__xss=1">raw link</a>\n\n'
    '<svg onload="window.__xss=1"><circle r="4"/></svg>\n\n'
    "| a | b |\n|---|---|\n| <img src=x onerror=window.__xss=1> | {{7*7}} |\n"
)


@dataclass
class World:
    role: Role
    agent: Agent
    tool: Tool
    workflow: Workflow
    version: WorkflowVersion
    run: Run
    agent_step: Step
    tool_step: Step
    waiting_step: Step
    tool_call: ToolCall
    pending: ApprovalRequest
    tool_approval: ApprovalRequest
    decided: ApprovalRequest
    text: str


def fit(model: type[models.Model], field: str, text: str) -> str:
    """`text` cut to what `model.field` holds."""
    return text[: model._meta.get_field(field).max_length]


def world_spec(text: str, agent: str, tool: str, revision: str = "") -> dict:
    """A valid spec whose node ids, labels and prompts carry `text` (the validator allows any
    text as a node id; only the editor's form restricts them). Node ids fit Step.node_id.

    A `revision` goes into every label and prompt, and into the id of the approval node: a
    diff of two revisions shows changed nodes (ids in attributes), an added and a removed one.
    """
    a = fit(Step, "node_id", f"research {text}")
    t = fit(Step, "node_id", f"tool {text}")
    gate = fit(Step, "node_id", f"gate{revision} {text}")
    said = f"{text}{revision}"
    return {
        "schema_version": 2,
        "input_schema": {
            "type": "object",
            "properties": {
                "topic": {"type": "string", "title": f"Topic {said}", "description": said}
            },
        },
        "nodes": [
            {
                "id": a,
                "kind": "agent",
                "agent": agent,
                "label": said,
                "prompt": f"Research {{topic}}: {said}",
            },
            {"id": t, "kind": "tool", "tool": tool, "label": said, "args": {"expression": said}},
            {"id": gate, "kind": "approval", "title": said, "prompt": said},
        ],
        "edges": [
            {"source": a, "target": t, "label": said},
            {"source": t, "target": gate, "label": said},
        ],
    }


def build_world(
    owner,
    text: str = COMBINED,
    *,
    members=(),
    slug: str = "world",
    markdown: str = MARKDOWN,
    shared: str | None = None,
) -> World:
    """A workflow of `owner` and one run of it, with `text` in every untrusted slot.

    Roles, agents and tools are shared by every user (they are configured in the admin), so
    their names and prompts get `shared` (by default `text` too).
    """
    with transaction.atomic():
        return _build(owner, text, members, slug, markdown, text if shared is None else shared)


def _build(owner, text: str, members, slug: str, markdown: str, shared: str) -> World:
    now = timezone.now()
    role, _ = Role.objects.get_or_create(
        name=fit(Role, "name", f"Role {shared}"), defaults={"goal": shared, "backstory": shared}
    )
    tool = Tool.objects.create(
        name=fit(Tool, "name", f"tool {slug} {shared}"),
        description=shared,
        entrypoint="baton.calculator",
        args_schema={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": shared}},
        },
        requires_approval=True,
    )
    agent = Agent.objects.create(
        name=fit(Agent, "name", f"agent {slug} {shared}"),
        role=role,
        model=fit(Agent, "model", f"scripted/{shared}"),
        system_prompt=shared,
    )
    agent.tools.set([tool])
    spec = world_spec(text, agent.name, tool.name)
    workflow = Workflow.objects.create(
        name=fit(Workflow, "name", f"Workflow {text}"),
        slug=slug,
        owner=owner,
        description=text,
        draft=spec,
    )
    workflow.members.set(members)
    version = workflow.publish(user=owner, note=fit(WorkflowVersion, "note", text))
    node_a, node_t, node_gate = (n["id"] for n in spec["nodes"])

    run = Run.objects.create(
        workflow=workflow,
        version=version,
        input={"topic": text},
        state={"topic": text},
        started_by=owner,
        status=Run.WAITING_APPROVAL,
        blocked_on=fit(Run, "blocked_on", text),
        error=text,
        result=markdown,
        started_at=now - timedelta(minutes=3),
        prompt_tokens=120,
        completion_tokens=80,
        total_tokens=200,
        cost=Decimal("0.0042"),
        budget=workflow.run_budget(),
    )
    events.append_event(
        run.pk,
        "run.created",
        {"status": run.status, "workflow": slug, "version": version.number, "note": text},
    )
    agent_step = Step.objects.create(
        run=run,
        node_id=node_a,
        kind="agent",
        agent=agent,
        status=Step.SUCCEEDED,
        model=agent.model,
        input={
            "messages": [{"role": "system", "content": text}, {"role": "user", "content": text}],
            "note": text,
        },
        output_text=markdown,
        output={"answer": text},
        error=text,
        attempts=[{"attempt": 1, "error_kind": "transient", "error": text, "at": now.isoformat()}],
        tool_calls=[
            {
                "tool": tool.name,
                "arguments": {"expression": text},
                "result": {"text": text},
                "error": text,
                "status": "failed",
            }
        ],
        prompt_tokens=120,
        completion_tokens=80,
        total_tokens=200,
        cost=Decimal("0.0042"),
        latency_ms=900,
        started_at=now - timedelta(minutes=3),
        finished_at=now,
    )
    tool_step = Step.objects.create(
        run=run,
        node_id=node_t,
        kind="tool",
        status=Step.FAILED,
        error=text,
        error_kind="permanent",
        input={"arguments": {"expression": text}},
        started_at=now - timedelta(minutes=2),
        finished_at=now,
    )
    tool_call = ToolCall.objects.create(
        step=tool_step,
        call_index=0,
        idempotency_key=f"{slug}-call-0",
        tool=tool.name,
        arguments={"expression": text},
        status=ToolCall.AWAITING_APPROVAL,
    )
    ToolCall.objects.create(
        step=agent_step,
        call_index=0,
        idempotency_key=f"{slug}-call-1",
        tool=tool.name,
        arguments={"expression": text},
        result={"text": text},
        error=text,
        status=ToolCall.FAILED,
        finished_at=now,
    )
    waiting_step = Step.objects.create(
        run=run,
        node_id=node_gate,
        kind="approval",
        status=Step.WAITING,
        input={"approval_open": True},
        started_at=now - timedelta(minutes=1),
    )
    for step in (agent_step, tool_step, waiting_step):
        events.append_event(
            run.pk,
            "step.created",
            {"step_id": step.pk, "node_id": step.node_id, "status": step.status},
        )
    events.append_events(
        run.pk,
        [
            (
                "step.finished",
                {
                    "step_id": agent_step.pk,
                    "node_id": node_a,
                    "status": "succeeded",
                    "output": text,
                },
            ),
            (
                "llm.called",
                {"step_id": agent_step.pk, "model": agent.model, "tokens": 200, "cost": "0.0042"},
            ),
            (
                "tool.called",
                {
                    "step_id": tool_step.pk,
                    "node_id": node_t,
                    "tool": tool.name,
                    "arguments": {"expression": text},
                    "result": text,
                    "error": text,
                },
            ),
            (
                "step.failed",
                {"step_id": tool_step.pk, "node_id": node_t, "status": "failed", "error": text},
            ),
            ("run.status", {"status": run.status, "error": text}),
            ("budget.warning", {"message": text}),
        ],
    )

    pending = hooks.request_approval(
        run=run,
        step=waiting_step,
        kind="node",
        title=text,
        payload={"output": text, "prompt": text},
        context={"node": node_gate, "previous_outputs": [{"node": node_a, "output": text}]},
        tool_call=None,
        due_in_s=3600,
        default_outcome="reject",
        approver_group=None,
    )
    tool_approval = hooks.request_approval(
        run=run,
        step=tool_step,
        kind="tool_call",
        title=text,
        payload={"tool": tool.name, "arguments": {"expression": text}},
        context={"node": node_t, "previous_outputs": [{"node": node_a, "output": text}]},
        tool_call=tool_call,
        due_in_s=None,
        default_outcome="reject",
        approver_group=None,
    )
    decided = ApprovalRequest.objects.create(
        run=run,
        step=agent_step,
        kind="escalation",
        title=fit(ApprovalRequest, "title", text),
        payload={"output": text},
        context={"reason": text},
        status=ApprovalRequest.REJECTED,
        decided_by=owner,
        decided_at=now,
        comment=text,
        edited_payload={"output": text},
    )
    events.append_event(
        run.pk,
        "approval.decided",
        {
            "request_id": decided.pk,
            "kind": decided.kind,
            "title": text,
            "approved": False,
            "comment": text,
            "decided_by": owner.username if owner else None,
        },
    )
    events.append_event(run.pk, "run.control", {"action": text, "user": text})

    usage = UsageRecord.objects.create(
        run=run,
        step=agent_step,
        workflow=workflow,
        agent=agent,
        user=owner,
        model=agent.model,
        prompt_tokens=120,
        completion_tokens=80,
        total_tokens=200,
        cost=Decimal("0.0042"),
        price_source=fit(UsageRecord, "price_source", text),
        response={"text": text},
        latency_ms=900,
        at=now,
    )
    costs.add_to_daily_usage(usage)  # the reports read this rollup; the engine keeps it so
    return World(
        role,
        agent,
        tool,
        workflow,
        version,
        run,
        agent_step,
        tool_step,
        waiting_step,
        tool_call,
        pending,
        tool_approval,
        decided,
        text,
    )
