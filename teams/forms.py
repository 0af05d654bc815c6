"""Forms of the workflow editor.

The side panel edits one node or edge of the draft at a time. The browser holds the draft while
the user edits (it autosaves it), so these forms do not write to the database: each turns the
posted fields plus the element's current JSON into the element's new JSON (`to_node`,
`to_edge`, `to_spec`), keeping keys they do not know about (an imported spec may carry them).
Syntax (JSON, whole numbers) is checked here; meaning (unknown agents, a router without a
default edge...) is left to `teams.spec.validate_spec`, which reports on the whole graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import transaction
from django.utils.text import slugify

from teams.models import Agent, Role, Workflow
from teams.spec import CONDITION_OPS, EDGE_TRIGGERS, empty_spec

# A node id is also the state key of its output, used in prompts as `{id}` or `{id.field}`.
IDENTIFIER = RegexValidator(
    r"^[A-Za-z_][A-Za-z0-9_]*\Z",
    "Use letters, digits and underscores, not starting with a digit: the id is also the state "
    "key you write as {id} in prompts.",
)
TEXTAREA = {"rows": 5, "spellcheck": "true"}
CODE = {"rows": 6, "spellcheck": "false", "class": "code"}


@dataclass
class EditorChoices:
    """What a node may refer to: the names the current user can pick."""

    agents: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    workflows: list[str] = field(default_factory=list)
    agent_models: dict[str, str] = field(default_factory=dict)


class JSONTextField(forms.CharField):
    """JSON typed into a textarea. Blank means "not set" (None)."""

    def __init__(self, *, expect: type | tuple[type, ...] | None = dict, **kwargs):
        self.expect = expect
        kwargs.setdefault("required", False)
        kwargs.setdefault("widget", forms.Textarea(attrs=CODE))
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, (dict, list)):
            return json.dumps(value, indent=2)
        return value

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if not text:
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(
                f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
            ) from exc
        except RecursionError as exc:
            raise ValidationError("Not usable JSON: nested too deeply.") from exc
        if self.expect is dict and not isinstance(parsed, dict):
            raise ValidationError("Must be a JSON object: {...}.")
        if self.expect is not None and not isinstance(parsed, self.expect):
            raise ValidationError("Wrong JSON type for this field.")
        return parsed


def _name_choices(names: list[str], current: Any, blank: str | None) -> list[tuple[str, str]]:
    """Choices for a select of names; a name the spec uses but that no longer exists is kept
    (marked missing) so opening the panel never silently changes the node."""
    choices = [("", blank)] if blank is not None else []
    choices += [(n, n) for n in names]
    for value in current if isinstance(current, list) else [current]:
        if isinstance(value, str) and value and value not in names:
            choices.append((value, f"{value} (missing)"))
    return choices


class NodeForm(forms.Form):
    """Fields every node has. Subclasses add their kind's keys (see teams/spec.py)."""

    kind = ""
    # Defaults of the engine: a key left at its default is not written into the node.
    DEFAULTS: dict[str, Any] = {}

    id = forms.CharField(
        max_length=120,
        validators=[IDENTIFIER],
        help_text=(
            "Unique in this workflow. Prompts of other nodes refer to it as {id}; "
            "renaming does not rewrite them."
        ),
    )
    label = forms.CharField(required=False, max_length=200, help_text="Shown on the canvas.")
    output_key = forms.CharField(
        required=False,
        max_length=120,
        validators=[IDENTIFIER],
        help_text="State key this node's output is stored under (the id when blank).",
    )

    def __init__(self, data=None, *, node: dict, choices: EditorChoices, other_ids: set[str]):
        self.node = node
        self.choices = choices
        self.other_ids = other_ids
        initial = {name: node.get(name, self.DEFAULTS.get(name)) for name in self.base_fields}
        super().__init__(data, initial=initial)
        self.set_choices()

    def set_choices(self) -> None:
        """Fill the selects from `self.choices` (subclasses)."""

    def agent_select(self, name: str, blank: str | None = "— choose an agent —") -> None:
        self.fields[name].choices = _name_choices(self.choices.agents, self.node.get(name), blank)

    def clean_id(self) -> str:
        node_id = self.cleaned_data["id"]
        if node_id in self.other_ids:
            raise ValidationError("Another node already has this id.")
        return node_id

    def to_node(self) -> dict:
        """The node with the posted values; blank fields are removed, unknown keys kept."""
        node = dict(self.node)
        node["kind"] = self.kind
        for name in self.fields:
            value = self.cleaned_data.get(name)
            if value is None or value == "" or value == []:
                node.pop(name, None)
            elif name in self.DEFAULTS and value == self.DEFAULTS[name] and name not in self.node:
                continue
            else:
                node[name] = value
        return node


def _prompt_field(
    help_text: str = "A template over the state: {input_key}, {node_id}, {node_id.field}.",
) -> forms.CharField:
    return forms.CharField(
        required=False, widget=forms.Textarea(attrs=TEXTAREA), help_text=help_text
    )


def _count_field(help_text: str = "") -> forms.IntegerField:
    return forms.IntegerField(required=False, min_value=1, help_text=help_text)


class AgentNodeForm(NodeForm):
    kind = "agent"
    DEFAULTS = {"tools_only": False, "escalate": True}

    agent = forms.ChoiceField(help_text="Who does this task (model, tools, retries, timeout).")
    prompt = _prompt_field()
    output_schema = JSONTextField(
        help_text=(
            "JSON schema the output must match. A reply that does not match gets one "
            "repair prompt, then fails."
        )
    )
    tools_only = forms.BooleanField(
        required=False, help_text="The agent may only answer through its tools."
    )
    escalate = forms.BooleanField(
        required=False, help_text="When the output keeps failing its schema, ask a human."
    )

    def set_choices(self) -> None:
        self.agent_select("agent")


class ToolNodeForm(NodeForm):
    kind = "tool"

    tool = forms.ChoiceField()
    args = JSONTextField(help_text="Arguments as a JSON object; string values are templates.")

    def set_choices(self) -> None:
        self.fields["tool"].choices = _name_choices(
            self.choices.tools, self.node.get("tool"), "— choose a tool —"
        )


class RouterNodeForm(NodeForm):
    kind = "router"

    agent = forms.ChoiceField(
        required=False,
        help_text=(
            "Optional. Without an agent the conditions on the outgoing edges decide; with one, the "
            "agent picks an edge by its label."
        ),
    )

    def set_choices(self) -> None:
        self.agent_select("agent", blank="— rules only —")


class ParallelNodeForm(NodeForm):
    kind = "parallel"

    branch_timeout_s = _count_field("Seconds a branch may take before the join stops waiting.")


class JoinNodeForm(NodeForm):
    kind = "join"
    DEFAULTS = {"on_branch_failure": "fail"}

    on_branch_failure = forms.ChoiceField(
        choices=[("fail", "Fail the run"), ("continue", "Continue with the branches that worked")],
        help_text="When a branch fails.",
    )


class SupervisorNodeForm(NodeForm):
    kind = "supervisor"

    agent = forms.ChoiceField(label="Supervisor", help_text="Plans and delegates to the workers.")
    workers = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple)
    max_turns = _count_field("Loop bound: delegations before the supervisor must answer.")
    prompt = _prompt_field()

    def set_choices(self) -> None:
        self.agent_select("agent")
        self.agent_select("workers", blank=None)


class VoteNodeForm(NodeForm):
    kind = "vote"
    DEFAULTS = {"mode": "pick"}

    agents = forms.MultipleChoiceField(
        widget=forms.CheckboxSelectMultiple, help_text="At least two answer independently."
    )
    judge = forms.ChoiceField()
    mode = forms.ChoiceField(
        choices=[
            ("pick", "Pick the best answer"),
            ("synthesise", "Synthesise one answer from all"),
        ]
    )
    prompt = _prompt_field()

    def set_choices(self) -> None:
        self.agent_select("agents", blank=None)
        self.agent_select("judge", blank="— choose the judge —")


class DebateNodeForm(NodeForm):
    kind = "debate"

    agents = forms.MultipleChoiceField(
        widget=forms.CheckboxSelectMultiple, help_text="At least two critique each other."
    )
    judge = forms.ChoiceField()
    max_rounds = _count_field("Loop bound: rounds of critique before the judge decides.")
    summarise_after_tokens = _count_field("Summarise the transcript once it is this long.")
    prompt = _prompt_field()

    def set_choices(self) -> None:
        self.agent_select("agents", blank=None)
        self.agent_select("judge", blank="— choose the judge —")


class SubworkflowNodeForm(NodeForm):
    kind = "subworkflow"

    workflow = forms.ChoiceField(label="Workflow")
    version = _count_field("A published version number; the latest when blank.")
    input = JSONTextField(help_text="The child's input as a JSON object of templates.")

    def set_choices(self) -> None:
        self.fields["workflow"].choices = _name_choices(
            self.choices.workflows, self.node.get("workflow"), "— choose a workflow —"
        )


class ApprovalNodeForm(NodeForm):
    kind = "approval"
    DEFAULTS = {"default_outcome": "reject"}

    title = forms.CharField(required=False, max_length=200, help_text="What the approver sees.")
    prompt = _prompt_field("Details for the approver; a template over the state.")
    due_in_s = _count_field("Seconds before the default outcome applies; never when blank.")
    default_outcome = forms.ChoiceField(choices=[("reject", "Reject"), ("approve", "Approve")])


NODE_FORMS: dict[str, type[NodeForm]] = {
    form.kind: form
    for form in (
        AgentNodeForm,
        ToolNodeForm,
        RouterNodeForm,
        ParallelNodeForm,
        JoinNodeForm,
        SupervisorNodeForm,
        VoteNodeForm,
        DebateNodeForm,
        SubworkflowNodeForm,
        ApprovalNodeForm,
    )
}


def _condition_value_text(value: Any) -> str:
    """Show a condition value so that posting it back gives the same value: strings that
    would read as JSON (e.g. "1") are shown quoted."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return json.dumps(value)


TRIGGER_LABELS = {
    "success": "On success",
    "failure": "On failure",
    "rejected": "When rejected (approval)",
}


class EdgeForm(forms.Form):
    on = forms.ChoiceField(
        choices=[(t, TRIGGER_LABELS.get(t, t)) for t in EDGE_TRIGGERS], label="Follow"
    )
    label = forms.CharField(
        required=False,
        max_length=200,
        help_text=("Shown on the canvas; an LLM router picks its edge by this label."),
    )
    default = forms.BooleanField(
        required=False,
        label="Default route",
        help_text="A router follows this edge when no condition holds.",
    )
    condition_path = forms.CharField(
        required=False,
        max_length=200,
        label="When state path",
        help_text="e.g. review.score (blank: no condition)",
    )
    condition_op = forms.ChoiceField(
        required=False,
        label="Operator",
        choices=[("", "—")] + [(op, op) for op in CONDITION_OPS],
    )
    condition_value = forms.CharField(
        required=False,
        max_length=1000,
        label="Value",
        help_text=('JSON (3, true, ["a","b"]) or plain text.'),
    )
    max_iterations = forms.IntegerField(
        required=False,
        min_value=1,
        label="Loop bound",
        help_text="Follow this edge at most this many times per run (needed on a cycle).",
    )

    def __init__(self, data=None, *, edge: dict):
        self.edge = edge
        condition = edge.get("condition") if isinstance(edge.get("condition"), dict) else {}
        initial = {
            "on": edge.get("on", "success"),
            "label": edge.get("label", ""),
            "default": bool(edge.get("default")),
            "condition_path": condition.get("path", ""),
            "condition_op": condition.get("op", "eq" if condition else ""),
            "condition_value": (
                _condition_value_text(condition["value"]) if "value" in condition else ""
            ),
            "max_iterations": edge.get("max_iterations"),
        }
        super().__init__(data, initial=initial)

    def clean(self) -> dict:
        data = super().clean()
        if not data.get("condition_path") and (
            data.get("condition_op") or data.get("condition_value")
        ):
            self.add_error("condition_path", "Say which state path the condition tests.")
        return data

    def to_edge(self) -> dict:
        edge = dict(self.edge)
        data = self.cleaned_data
        for name in ("label", "max_iterations"):
            if data[name] in (None, ""):
                edge.pop(name, None)
            else:
                edge[name] = data[name]
        if data["on"] == "success" and "on" not in self.edge:
            edge.pop("on", None)
        else:
            edge["on"] = data["on"]
        if data["default"]:
            edge["default"] = True
        else:
            edge.pop("default", None)
        if data["condition_path"]:
            condition = {"path": data["condition_path"], "op": data["condition_op"] or "eq"}
            if data["condition_value"] != "":
                try:
                    condition["value"] = json.loads(data["condition_value"])
                except (json.JSONDecodeError, RecursionError):
                    condition["value"] = data["condition_value"]
            edge["condition"] = condition
        else:
            edge.pop("condition", None)
        return edge


class WorkflowSettingsForm(forms.Form):
    """The spec's top level: entry node, input schema, state schema."""

    entry = forms.ChoiceField(required=False, help_text="Where a run starts.")
    input_schema = JSONTextField(
        required=True,
        widget=forms.Textarea(attrs={**CODE, "rows": 10}),
        help_text="JSON schema of the run input; its properties are the {variables} of prompts, "
        'e.g. {"type": "object", "properties": {"topic": {"type": "string"}}, '
        '"required": ["topic"]}',
    )
    state_schema = JSONTextField(help_text="Optional: documents the state keys.")

    def __init__(self, data=None, *, spec: dict):
        self.spec = spec
        initial = {key: spec.get(key) for key in ("entry", "input_schema", "state_schema")}
        super().__init__(data, initial=initial)
        nodes = spec.get("nodes") if isinstance(spec.get("nodes"), list) else []
        ids = [n["id"] for n in nodes if isinstance(n, dict) and isinstance(n.get("id"), str)]
        self.fields["entry"].choices = _name_choices(
            ids, spec.get("entry"), f"first node ({ids[0]})" if ids else "first node"
        )

    def to_spec(self) -> dict:
        """The spec's top-level keys with the posted values (nodes and edges untouched)."""
        top = {k: v for k, v in self.spec.items() if k not in ("nodes", "edges")}
        for name in self.fields:
            value = self.cleaned_data.get(name)
            if value in (None, ""):
                top.pop(name, None)
            else:
                top[name] = value
        return top


class WorkflowCreateForm(forms.Form):
    """A plain form, not a ModelForm: Workflow.clean() refuses an invalid draft, and a new
    workflow's draft is empty (invalid) until nodes are added in the editor."""

    name = forms.CharField(max_length=200)
    slug = forms.SlugField(
        required=False,
        max_length=120,
        help_text="Used in URLs and by sub-workflow nodes; made from the name when blank.",
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))

    def clean_slug(self) -> str:
        slug = self.cleaned_data.get("slug") or slugify(self.data.get("name", ""))[:120]
        if not slug:
            raise ValidationError("Give the workflow a name or a slug made of letters.")
        if Workflow.objects.filter(slug=slug).exists():
            raise ValidationError(f"The slug {slug!r} is taken; choose another.")
        return slug

    def save(self, owner) -> Workflow:
        return Workflow.objects.create(
            name=self.cleaned_data["name"],
            slug=self.cleaned_data["slug"],
            description=self.cleaned_data["description"],
            owner=owner,
            draft=empty_spec(),
        )


class PublishForm(forms.Form):
    note = forms.CharField(required=False, max_length=500)


class InlineAgentForm(forms.ModelForm):
    """Create an agent (and its role when new) from the editor's side panel."""

    role_name = forms.CharField(
        max_length=120,
        label="Role",
        help_text=(
            "CrewAI's role, e.g. 'Senior researcher'. An existing role of that name is reused."
        ),
    )
    goal = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}))
    backstory = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))

    class Meta:
        model = Agent
        fields = ["name", "model", "tools", "max_retries", "timeout_s"]
        widgets = {"tools": forms.CheckboxSelectMultiple}
        labels = {"max_retries": "Retries", "timeout_s": "Timeout (s)"}

    def save(self, commit: bool = True) -> Agent:
        with transaction.atomic():
            role, _ = Role.objects.get_or_create(
                name=self.cleaned_data["role_name"],
                defaults={
                    "goal": self.cleaned_data["goal"],
                    "backstory": self.cleaned_data["backstory"],
                },
            )
            self.instance.role = role
            return super().save(commit=commit)


def _input_field(prop: dict, required: bool) -> forms.Field:
    """A form field for one property of a run's input schema."""
    prop = prop if isinstance(prop, dict) else {}
    kind = prop.get("type")
    common = {
        "required": required and kind != "boolean",
        "label": prop.get("title") or None,
        "help_text": prop.get("description", ""),
        "initial": prop.get("default"),
    }
    if isinstance(prop.get("enum"), list) and all(isinstance(v, str) for v in prop["enum"]):
        return forms.ChoiceField(choices=[("", "—")] + [(v, v) for v in prop["enum"]], **common)
    if kind == "string":
        return forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), strip=False, **common)
    if kind == "integer":
        return forms.IntegerField(**common)
    if kind == "number":
        return forms.FloatField(**common)
    if kind == "boolean":
        return forms.BooleanField(**common)
    expect = {"array": list, "object": dict}.get(kind)
    return JSONTextField(expect=expect, **common)


class RunInputForm(forms.Form):
    """The run input, one field per property of the input schema. The engine validates the
    whole input against the schema again when the run starts."""

    def __init__(self, data=None, *, schema: dict):
        super().__init__(data, prefix="input")
        schema = schema if isinstance(schema, dict) else {}
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        self.required_names = set(schema.get("required") or [])
        for name, prop in properties.items():
            self.fields[name] = _input_field(prop, name in self.required_names)

    def input(self) -> dict:
        return {
            name: value
            for name, value in self.cleaned_data.items()
            if name in self.required_names or value not in (None, "")
        }
