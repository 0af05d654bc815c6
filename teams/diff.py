"""A readable diff between two workflow specs, grouped the way a reviewer reads a change.

`diff_specs(before, after)` compares two specs (already upgraded to the current schema version)
and returns a `SpecDiff`: nodes added / removed / changed (with field-level before and after, and
a line diff for long text such as prompts), edges added / removed / changed, input schema changes
per property, and any other top-level change (entry node, state schema).

Pure: no database access. The caller may pass `agent_models` ({agent name: model}) so that a
change of agent also says which model each side runs on.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Fields a reviewer looks at first, in this order; anything else follows alphabetically.
FIELD_ORDER = (
    "kind",
    "label",
    "agent",
    "agents",
    "workers",
    "judge",
    "model",
    "tool",
    "tools",
    "workflow",
    "version",
    "prompt",
    "title",
    "args",
    "input",
    "output_schema",
    "output_key",
    "mode",
    "max_turns",
    "max_rounds",
    "summarise_after_tokens",
    "branch_timeout_s",
    "on_branch_failure",
    "tools_only",
    "escalate",
    "due_in_s",
    "default_outcome",
)
FIELD_LABELS = {
    "agent": "Agent",
    "agents": "Agents",
    "workers": "Workers",
    "judge": "Judge",
    "model": "Model",
    "tool": "Tool",
    "tools": "Tools",
    "prompt": "Prompt",
    "output_schema": "Output schema",
    "args": "Tool arguments",
    "input": "Input",
    "workflow": "Sub-workflow",
    "version": "Sub-workflow version",
    "label": "Label",
    "output_key": "Output key",
    "title": "Title",
    "due_in_s": "Due in (s)",
    "default_outcome": "Default outcome",
    "max_turns": "Max turns",
    "max_rounds": "Max rounds",
    "summarise_after_tokens": "Summarise after (tokens)",
    "branch_timeout_s": "Branch timeout (s)",
    "on_branch_failure": "On branch failure",
    "tools_only": "Tools only",
    "escalate": "Escalate to a human",
    "mode": "Mode",
    "kind": "Kind",
    "condition": "Condition",
    "default": "Default route",
    "max_iterations": "Loop bound",
    "entry": "Entry node",
    "state_schema": "State schema",
    "required": "Required inputs",
}
AGENT_FIELDS = ("agent", "agents", "workers", "judge")
# Text this long (or spanning lines) is shown as a line diff instead of before/after blocks.
LONG_TEXT = 80


@dataclass
class FieldChange:
    field: str
    before: Any
    after: Any
    before_text: str = ""
    after_text: str = ""
    # [(" " | "-" | "+", line)] for long text; empty when before/after are short.
    lines: list[tuple[str, str]] = field(default_factory=list)
    # A name of the user's (an input property), shown as it is rather than as a field label.
    plain: bool = False

    @property
    def label(self) -> str:
        if self.plain:
            return self.field
        return FIELD_LABELS.get(self.field, self.field.replace("_", " ").capitalize())

    @property
    def added(self) -> bool:
        return self.before is None

    @property
    def removed(self) -> bool:
        return self.after is None


@dataclass
class NodeChange:
    id: str
    kind: str
    fields: list[FieldChange]


@dataclass
class EdgeChange:
    source: str
    target: str
    on: str
    fields: list[FieldChange]


@dataclass
class SpecDiff:
    nodes_added: list[dict] = field(default_factory=list)
    nodes_removed: list[dict] = field(default_factory=list)
    nodes_changed: list[NodeChange] = field(default_factory=list)
    edges_added: list[dict] = field(default_factory=list)
    edges_removed: list[dict] = field(default_factory=list)
    edges_changed: list[EdgeChange] = field(default_factory=list)
    input_schema: list[FieldChange] = field(default_factory=list)
    other: list[FieldChange] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (
            self.nodes_added
            or self.nodes_removed
            or self.nodes_changed
            or self.edges_added
            or self.edges_removed
            or self.edges_changed
            or self.input_schema
            or self.other
        )

    def summary(self) -> str:
        """One line for a list: '2 nodes added, 1 changed, 1 edge removed'."""
        parts = []
        for count, what in (
            (len(self.nodes_added), "node{s} added"),
            (len(self.nodes_removed), "node{s} removed"),
            (len(self.nodes_changed), "node{s} changed"),
            (len(self.edges_added), "edge{s} added"),
            (len(self.edges_removed), "edge{s} removed"),
            (len(self.edges_changed), "edge{s} changed"),
            (len(self.input_schema), "input change{s}"),
            (len(self.other), "other change{s}"),
        ):
            if count:
                parts.append(f"{count} {what.format(s='' if count == 1 else 's')}")
        return ", ".join(parts) or "no changes"


def diff_specs(
    before: Mapping | None, after: Mapping | None, agent_models: Mapping[str, str] | None = None
) -> SpecDiff:
    before = before or {}
    after = after or {}
    models = agent_models or {}
    diff = SpecDiff()

    old_nodes = _nodes_by_id(before)
    new_nodes = _nodes_by_id(after)
    diff.nodes_added = [node for nid, node in new_nodes.items() if nid not in old_nodes]
    diff.nodes_removed = [node for nid, node in old_nodes.items() if nid not in new_nodes]
    for nid, new in new_nodes.items():
        old = old_nodes.get(nid)
        if old is None or old == new:
            continue
        fields = _field_changes(old, new, skip=("id",), models=models)
        if fields:
            diff.nodes_changed.append(NodeChange(nid, str(new.get("kind", "")), fields))

    old_edges = _edges_by_key(before)
    new_edges = _edges_by_key(after)
    for key in dict.fromkeys([*old_edges, *new_edges]):
        olds, news = old_edges.get(key, []), new_edges.get(key, [])
        # Pair edges with the same ends and trigger in order; the surplus was added or removed.
        for old, new in zip(olds, news, strict=False):
            if old != new:
                fields = _field_changes(old, new, skip=("source", "target", "on"), models=models)
                if fields:
                    diff.edges_changed.append(EdgeChange(*key, fields))
        diff.edges_added += news[len(olds) :]
        diff.edges_removed += olds[len(news) :]

    diff.input_schema = _schema_changes(before.get("input_schema"), after.get("input_schema"))
    skip = {"nodes", "edges", "input_schema", "schema_version"}
    for key in sorted((set(before) | set(after)) - skip, key=_field_rank):
        if before.get(key) != after.get(key):
            diff.other.append(_change(key, before.get(key), after.get(key), models))
    return diff


def edge_condition_text(edge: Mapping) -> str:
    """'score gte 3' for an edge's condition, '' when it has none."""
    condition = edge.get("condition")
    if not isinstance(condition, Mapping):
        return ""
    op = condition.get("op", "eq")
    if op in ("exists", "truthy"):
        return f"{condition.get('path', '?')} {op}"
    return f"{condition.get('path', '?')} {op} {json.dumps(condition.get('value'))}"


def _nodes_by_id(spec: Mapping) -> dict[str, dict]:
    nodes = spec.get("nodes") if isinstance(spec.get("nodes"), list) else []
    return {n["id"]: n for n in nodes if isinstance(n, dict) and isinstance(n.get("id"), str)}


def _edges_by_key(spec: Mapping) -> dict[tuple[str, str, str], list[dict]]:
    edges: dict[tuple[str, str, str], list[dict]] = {}
    for edge in spec.get("edges") if isinstance(spec.get("edges"), list) else []:
        if isinstance(edge, dict):
            key = (str(edge.get("source")), str(edge.get("target")), str(edge.get("on", "success")))
            edges.setdefault(key, []).append(edge)
    return edges


def _field_rank(name: str) -> tuple[int, str]:
    return (FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER), name)


def _field_changes(
    old: Mapping, new: Mapping, skip: tuple[str, ...], models: Mapping[str, str]
) -> list[FieldChange]:
    keys = sorted((set(old) | set(new)) - set(skip), key=_field_rank)
    return [_change(k, old.get(k), new.get(k), models) for k in keys if old.get(k) != new.get(k)]


def _change(
    name: str, before: Any, after: Any, models: Mapping[str, str], plain: bool = False
) -> FieldChange:
    """`plain` shows values as they are (input properties may be called `agent` too)."""
    change = FieldChange(name, before, after, plain=plain)
    change.before_text = _display(None if plain else name, before, models)
    change.after_text = _display(None if plain else name, after, models)
    if _is_long(change.before_text) or _is_long(change.after_text):
        change.lines = [
            (line[0], line[2:])
            for line in difflib.ndiff(
                change.before_text.splitlines(), change.after_text.splitlines()
            )
            if line[0] in " -+"
        ]
    return change


def _is_long(text: str) -> bool:
    return len(text) > LONG_TEXT or "\n" in text


def _display(name: str | None, value: Any, models: Mapping[str, str]) -> str:
    if value is None:
        return ""
    if name in AGENT_FIELDS:
        names = value if isinstance(value, list) else [value]
        return ", ".join(
            f"{n} ({models[n]})" if isinstance(n, str) and n in models else str(n) for n in names
        )
    if name == "condition" and isinstance(value, Mapping):
        return edge_condition_text({"condition": value})
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=2, sort_keys=True)
    return str(value)


def _schema_changes(before: Any, after: Any) -> list[FieldChange]:
    """Per input property: added, removed or changed; plus the required list and other keys."""
    before = before if isinstance(before, Mapping) else {}
    after = after if isinstance(after, Mapping) else {}
    changes: list[FieldChange] = []
    old_props = before.get("properties") if isinstance(before.get("properties"), Mapping) else {}
    new_props = after.get("properties") if isinstance(after.get("properties"), Mapping) else {}
    for prop in dict.fromkeys([*old_props, *new_props]):
        old, new = old_props.get(prop), new_props.get(prop)
        if old != new:
            changes.append(_change(prop, old, new, {}, plain=True))
    old_required = sorted(before.get("required") or [])
    new_required = sorted(after.get("required") or [])
    if old_required != new_required:
        changes.append(
            FieldChange(
                "required",
                old_required,
                new_required,
                ", ".join(old_required) or "none",
                ", ".join(new_required) or "none",
            )
        )
    for key in sorted((set(before) | set(after)) - {"properties", "required"}):
        if before.get(key) != after.get(key):
            changes.append(_change(key, before.get(key), after.get(key), {}, plain=True))
    return changes
