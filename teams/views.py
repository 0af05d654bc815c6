"""The workflow editor: list and create workflows, edit the draft on a canvas, publish versions,
compare and roll back, and test-run from the editor.

The browser holds the draft while someone edits: it autosaves the spec and the layout through
`workflow_draft` (PUT) and gets the spec's problems back. The side panel is a server-rendered
form (`panel_open` renders it for the selected node, edge or the workflow; `panel_apply` checks
an edit and sends the element's new JSON back in an htmx event). Nothing here changes a
published version: publishing and rollback create new ones.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import reswap, trigger_client_event

from teams.diff import diff_specs, edge_condition_text
from teams.forms import (
    NODE_FORMS,
    EdgeForm,
    EditorChoices,
    InlineAgentForm,
    PublishForm,
    WorkflowCreateForm,
    WorkflowSettingsForm,
)
from teams.models import Agent, Tool, Workflow, WorkflowVersion
from teams.spec import NODE_KINDS, Problem, empty_spec, upgrade_spec, validate_spec

# What each kind is for, shown in the palette.
KIND_HELP = {
    "agent": "An agent does one task",
    "tool": "Call one tool",
    "router": "Pick one outgoing edge",
    "parallel": "Fan out to branches",
    "join": "Wait for the branches",
    "supervisor": "Delegate to workers",
    "vote": "Several answer, a judge picks",
    "debate": "Critique rounds, then a judge",
    "subworkflow": "Run another workflow",
    "approval": "A human approves",
}


# Kinds whose panel offers "create a new agent".
AGENT_KINDS = ("agent", "router", "supervisor", "vote", "debate")


# --- access and shared helpers --------------------------------------------------------------


def workflow_or_404(request: HttpRequest, slug: str) -> Workflow:
    """The workflow if this user may see (and so edit) it; 404 for everyone else."""
    return get_object_or_404(Workflow.objects.for_user(request.user), slug=slug)


def version_or_404(workflow: Workflow, number: Any) -> WorkflowVersion:
    try:
        return workflow.versions.get(number=int(number))
    except (TypeError, ValueError, WorkflowVersion.DoesNotExist) as exc:
        raise Http404("No such version") from exc


def editor_choices(request: HttpRequest, workflow: Workflow) -> EditorChoices:
    agents = list(Agent.objects.values_list("name", "model"))
    return EditorChoices(
        agents=[name for name, _ in agents],
        tools=list(Tool.objects.values_list("name", flat=True)),
        # A workflow may not call itself: that recursion would have no bound.
        workflows=list(
            Workflow.objects.for_user(request.user)
            .exclude(pk=workflow.pk)
            .values_list("slug", flat=True)
        ),
        agent_models=dict(agents),
    )


def spec_problems(spec: Any, choices: EditorChoices) -> list[Problem]:
    """The spec validator with every reference checked against what exists."""
    return validate_spec(
        spec,
        known_agents=set(choices.agents),
        known_tools=set(choices.tools),
        known_workflows=set(choices.workflows),
    )


def _problem_dicts(problems: list[Problem]) -> list[dict]:
    return [{**p.as_dict(), "text": str(p)} for p in problems]


def draft_spec(workflow: Workflow) -> dict:
    return upgrade_spec(workflow.draft) if workflow.draft else empty_spec()


def _differs_from_latest(workflow: Workflow, spec: dict) -> bool:
    latest = workflow.latest_version()
    return latest is None or latest.get_spec() != upgrade_spec(spec)


def _list(value: Any) -> list:
    """A spec's list (nodes, edges) as posted: anything else counts as empty here; the
    validator reports it."""
    return value if isinstance(value, list) else []


def _strict_json(text):
    """json.loads without what Python reads but no JSON column stores (NaN, Infinity, 1e999),
    and with nesting past the recursion limit refused: each is a ValueError."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    def finite(number: str) -> float:
        value = float(number)
        return refuse(number) if value in (float("inf"), float("-inf")) else value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_body(request: HttpRequest) -> dict:
    try:
        body = _strict_json(request.body or b"{}")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise ValidationError(f"The body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValidationError("The body must be a JSON object.")
    return body


def _posted_json(request: HttpRequest, name: str) -> dict:
    """A JSON object the editor posts in a form field (the node, edge or spec it shows)."""
    try:
        value = _strict_json(request.POST.get(name) or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValidationError(f"`{name}` must be a JSON object.")
    return value


def _clean_layout(layout: Any, spec: dict) -> dict:
    """Keep {node_id: {x, y}} for the spec's nodes only, so deleted nodes leave nothing behind."""
    if not isinstance(layout, dict):
        raise ValidationError("`layout` must be an object of {node_id: {x, y}}.")
    ids = {
        n.get("id")
        for n in _list(spec.get("nodes"))
        if isinstance(n, dict) and isinstance(n.get("id"), str)
    }
    clean = {}
    for node_id, pos in layout.items():
        if node_id not in ids:
            continue
        if not isinstance(pos, dict) or not all(
            isinstance(pos.get(axis), (int, float))
            and not isinstance(pos.get(axis), bool)
            and math.isfinite(pos.get(axis))
            for axis in ("x", "y")
        ):
            raise ValidationError(f"layout of {node_id!r} must be {{x: number, y: number}}.")
        clean[node_id] = {"x": round(pos["x"], 1), "y": round(pos["y"], 1)}
    return clean


def _revision(workflow: Workflow) -> str:
    return workflow.updated_at.isoformat()


def _parse_revision(value: Any) -> datetime:
    parsed = parse_datetime(value) if isinstance(value, str) else None
    if parsed is None:
        raise ValidationError("`revision` must be the value the draft endpoint returned.")
    return parsed


def _draft_state(workflow: Workflow, spec: dict, problems: list[Problem]) -> dict:
    latest = workflow.latest_version()
    return {
        "problems": _problem_dicts(problems),
        "revision": _revision(workflow),
        "latest_version": latest.number if latest else None,
        "differs_from_latest": _differs_from_latest(workflow, spec),
    }


# --- list and create ------------------------------------------------------------------------


@require_GET
def workflow_list(request: HttpRequest) -> HttpResponse:
    workflows = (
        Workflow.objects.for_user(request.user)
        .annotate(version_count=Count("versions", distinct=True))
        .select_related("owner")
        .order_by("name")
    )
    return render(request, "teams/workflow_list.html", {"workflows": workflows})


@require_http_methods(["GET", "POST"])
def workflow_create(request: HttpRequest) -> HttpResponse:
    form = WorkflowCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        workflow = form.save(owner=request.user)
        return redirect("teams:editor", slug=workflow.slug)
    return render(request, "teams/workflow_create.html", {"form": form})


# --- the editor page and its draft ----------------------------------------------------------


@require_GET
def workflow_editor(request: HttpRequest, slug: str) -> HttpResponse:
    workflow = workflow_or_404(request, slug)
    spec = draft_spec(workflow)
    problems = spec_problems(spec, editor_choices(request, workflow))
    config = {
        "slug": workflow.slug,
        "spec": spec,
        "layout": workflow.layout or {},
        **_draft_state(workflow, spec, problems),
        "kinds": [{"kind": k, "help": KIND_HELP[k]} for k in NODE_KINDS],
        "urls": {
            "draft": reverse("teams:draft", args=[slug]),
            "publish": reverse("teams:publish", args=[slug]),
            "panel": reverse("teams:panel_open", args=[slug]),
            "run": reverse("runs:editor_run", args=[slug]),
            "versions": reverse("teams:versions", args=[slug]),
        },
    }
    return render(
        request,
        "teams/editor.html",
        {
            "workflow": workflow,
            "config": config,
            "kinds": config["kinds"],
        },
    )


@require_http_methods(["GET", "PUT"])
def workflow_draft(request: HttpRequest, slug: str) -> JsonResponse:
    """GET: the draft, its layout and problems. PUT {spec, layout, revision?}: save both.

    An invalid draft is saved (it is a draft) and its problems come back. `revision` is the
    value the editor last saw; when the workflow changed since (another tab, another user) the
    save is refused with 409 so nobody overwrites work they never saw.
    """
    workflow = workflow_or_404(request, slug)
    choices = editor_choices(request, workflow)
    if request.method == "GET":
        spec = draft_spec(workflow)
        return JsonResponse(
            {
                "spec": spec,
                "layout": workflow.layout or {},
                **_draft_state(workflow, spec, spec_problems(spec, choices)),
            }
        )
    try:
        body = _json_body(request)
        spec = body.get("spec")
        if not isinstance(spec, dict):
            raise ValidationError("`spec` must be a JSON object.")
        spec = upgrade_spec(spec)
        layout = _clean_layout(body.get("layout", {}), spec)
        revision = _parse_revision(body["revision"]) if body.get("revision") else None
    except ValidationError as exc:
        return JsonResponse({"error": " ".join(exc.messages)}, status=400)
    # Compare-and-swap on updated_at: of two saves based on the same revision only one wins.
    rows = Workflow.objects.filter(pk=workflow.pk)
    if revision is not None:
        rows = rows.filter(updated_at=revision)
    now = timezone.now()
    if not rows.update(draft=spec, layout=layout, updated_at=now):
        workflow.refresh_from_db(fields=["updated_at"])
        return JsonResponse(
            {
                "error": "This workflow was changed elsewhere since you opened it. Reload to see "
                "the latest draft.",
                "revision": _revision(workflow),
            },
            status=409,
        )
    workflow.draft, workflow.layout, workflow.updated_at = spec, layout, now
    return JsonResponse(_draft_state(workflow, spec, spec_problems(spec, choices)))


@require_POST
def workflow_publish(request: HttpRequest, slug: str) -> JsonResponse:
    """Freeze the saved draft as the next version. Refused while it has problems."""
    workflow = workflow_or_404(request, slug)
    form = PublishForm(request.POST)
    if not form.is_valid():
        return JsonResponse({"error": " ".join(form.errors.get("note", []))}, status=400)
    spec = draft_spec(workflow)
    problems = spec_problems(spec, editor_choices(request, workflow))
    if problems:
        return JsonResponse(
            {
                "error": "Fix the problems before publishing.",
                "problems": _problem_dicts(problems),
            },
            status=400,
        )
    if not _differs_from_latest(workflow, spec):
        latest = workflow.latest_version()
        return JsonResponse(
            {"error": f"Nothing changed since version {latest.number}."}, status=409
        )
    version = workflow.publish(user=request.user, note=form.cleaned_data["note"], spec=spec)
    return JsonResponse(
        {
            "version": version.number,
            "versions_url": reverse("teams:versions", args=[slug]),
            **_draft_state(workflow, spec, []),
        }
    )


# --- side panel -----------------------------------------------------------------------------


def _upstream(spec: dict, node_id: str) -> list[str]:
    """State keys the node may read: the outputs of every node that can run before it."""
    by_id = {n.get("id"): n for n in _list(spec.get("nodes")) if isinstance(n, dict)}
    incoming: dict[str, list[str]] = {}
    for edge in _list(spec.get("edges")):
        if isinstance(edge, dict):
            incoming.setdefault(edge.get("target"), []).append(edge.get("source"))
    seen: list[str] = []
    stack = list(incoming.get(node_id, []))
    while stack:
        nid = stack.pop()
        if nid in seen or nid == node_id or nid not in by_id:
            continue
        seen.append(nid)
        stack += incoming.get(nid, [])
    return sorted(by_id[nid].get("output_key") or nid for nid in seen)


def _input_names(spec: dict) -> list[str]:
    schema = spec.get("input_schema")
    props = schema.get("properties") if isinstance(schema, dict) else None
    return list(props) if isinstance(props, dict) else []


def _node_form(request: HttpRequest, workflow: Workflow, node: dict, spec: dict, data=None):
    form_class = NODE_FORMS.get(node.get("kind"))
    if form_class is None:
        raise ValidationError(f"Unknown node kind {node.get('kind')!r}.")
    other_ids = {
        n.get("id")
        for n in _list(spec.get("nodes"))
        if isinstance(n, dict) and n.get("id") != node.get("id")
    }
    choices = editor_choices(request, workflow)
    return form_class(data, node=node, choices=choices, other_ids=other_ids)


def _agent_named(name: Any) -> Agent | None:
    if not isinstance(name, str) or not name:
        return None
    return Agent.objects.select_related("role").prefetch_related("tools").filter(name=name).first()


def _panel_context(
    request: HttpRequest, workflow: Workflow, spec: dict, target: str, form, element: dict
) -> dict:
    context = {"workflow": workflow, "target": target, "form": form, "element": element}
    if target == "node":
        node_id = element.get("id")
        context["variables"] = {
            "inputs": _input_names(spec),
            "upstream": _upstream(spec, node_id),
        }
        context["agent"] = _agent_named(element.get("agent"))
        context["agent_form"] = InlineAgentForm(prefix="new_agent")
        context["takes_agents"] = element.get("kind") in AGENT_KINDS
        context["out_edges"] = [
            {
                "target": e.get("target"),
                "condition": edge_condition_text(e),
                "default": bool(e.get("default")),
                "label": e.get("label", ""),
                "on": e.get("on", "success"),
            }
            for e in _list(spec.get("edges"))
            if isinstance(e, dict) and e.get("source") == node_id
        ]
    return context


@require_POST
def panel_open(request: HttpRequest, slug: str) -> HttpResponse:
    """Render the side panel for the element the editor selected, from the JSON it posts:
    `target` (node | edge | workflow), `element` (the node or edge) and `spec` (the draft as
    the editor holds it, for the state variables and the node ids)."""
    workflow = workflow_or_404(request, slug)
    target = request.POST.get("target", "workflow")
    try:
        spec = _posted_json(request, "spec")
        element = _posted_json(request, "element") if target != "workflow" else spec
        if target == "node":
            form = _node_form(request, workflow, element, spec)
        elif target == "edge":
            form = EdgeForm(edge=element)
        else:
            target, form = "workflow", WorkflowSettingsForm(spec=spec)
    except ValidationError as exc:
        return HttpResponse(" ".join(exc.messages), status=400)
    context = _panel_context(request, workflow, spec, target, form, element)
    return render(request, "teams/panel.html", context)


@require_POST
def panel_apply(request: HttpRequest, slug: str) -> HttpResponse:
    """Check one edit of the panel's form. The response only swaps the error slots (out of
    band, so the field being typed in keeps its focus) and, when the edit is valid, sends the
    element's new JSON to the editor in a `baton:element-changed` event."""
    workflow = workflow_or_404(request, slug)
    target = request.POST.get("target")
    try:
        spec = _posted_json(request, "spec")
        element = _posted_json(request, "element") if target != "workflow" else spec
        if target == "node":
            form = _node_form(request, workflow, element, spec, data=request.POST)
        elif target == "edge":
            form = EdgeForm(request.POST, edge=element)
        elif target == "workflow":
            form = WorkflowSettingsForm(request.POST, spec=spec)
        else:
            raise ValidationError("Unknown panel target.")
    except ValidationError as exc:
        return HttpResponse(" ".join(exc.messages), status=400)
    context = {"form": form, "oob": True, "agent_card": "agent" in form.fields}
    if form.is_valid() and "agent" in form.fields:
        context["agent"] = _agent_named(form.cleaned_data.get("agent"))
    response = render(request, "teams/panel.html#errors", context)
    if form.is_valid():
        if target == "node":
            changed = form.to_node()
        elif target == "edge":
            changed = form.to_edge()
        else:
            changed = form.to_spec()
        # Not "target": htmx reads that key of an event's detail as the element to fire on.
        trigger_client_event(
            response,
            "baton:element-changed",
            {
                "subject": target,
                "key": request.POST.get("key", ""),
                "element": changed,
            },
        )
    return reswap(response, "none")


@require_POST
def agent_create(request: HttpRequest, slug: str) -> HttpResponse:
    """Create an agent (and its role) from the node panel, then re-render the panel with the
    node using it."""
    workflow = workflow_or_404(request, slug)
    try:
        spec = _posted_json(request, "spec")
        node = _posted_json(request, "element")
        if node.get("kind") not in AGENT_KINDS:
            raise ValidationError("This kind of node has no agent.")
        form = _node_form(request, workflow, node, spec)
    except ValidationError as exc:
        return HttpResponse(" ".join(exc.messages), status=400)
    agent_form = InlineAgentForm(request.POST, prefix="new_agent")
    if not agent_form.is_valid():
        context = _panel_context(request, workflow, spec, "node", form, node)
        context.update(agent_form=agent_form, agent_form_open=True)
        return render(request, "teams/panel.html", context)
    agent = agent_form.save()
    # The new agent takes the node's main agent slot when it is free (or on an agent node,
    # where it was made for it); otherwise it joins the node's list of agents.
    node = dict(node)
    kind = node.get("kind")
    if kind in ("agent", "router") or (kind == "supervisor" and not node.get("agent")):
        node["agent"] = agent.name
    elif kind == "supervisor":
        node["workers"] = [*(node.get("workers") or []), agent.name]
    elif kind in ("vote", "debate"):
        node["agents"] = [*(node.get("agents") or []), agent.name]
    form = _node_form(request, workflow, node, spec)
    context = _panel_context(request, workflow, spec, "node", form, node)
    context["created_agent"] = agent
    response = render(request, "teams/panel.html", context)
    return trigger_client_event(
        response,
        "baton:element-changed",
        {
            "subject": "node",
            "key": request.POST.get("key", ""),
            "element": node,
        },
    )


# --- versions, diff, rollback ---------------------------------------------------------------


@require_GET
def workflow_versions(request: HttpRequest, slug: str) -> HttpResponse:
    workflow = workflow_or_404(request, slug)
    versions = list(
        workflow.versions.select_related("created_by")
        .annotate(run_count=Count("runs"))
        .order_by("-number")
    )
    # Each version's change against the one before it, for a one-line summary.
    for newer, older in zip(versions, versions[1:], strict=False):
        newer.change_summary = diff_specs(older.get_spec(), newer.get_spec()).summary()
    if versions:
        versions[-1].change_summary = "first version"
    return render(
        request,
        "teams/versions.html",
        {
            "workflow": workflow,
            "versions": versions,
            "draft_differs": bool(versions)
            and _differs_from_latest(workflow, draft_spec(workflow)),
        },
    )


def _side(workflow: Workflow, value: str | None) -> tuple[str, dict, WorkflowVersion | None]:
    """One side of a diff: a version number or 'draft'."""
    if value == "draft":
        return "Draft", draft_spec(workflow), None
    version = version_or_404(workflow, value)
    return f"Version {version.number}", version.get_spec(), version


@require_GET
def workflow_diff(request: HttpRequest, slug: str) -> HttpResponse:
    workflow = workflow_or_404(request, slug)
    numbers = list(workflow.versions.order_by("-number").values_list("number", flat=True))
    if not numbers:
        raise Http404("Nothing published yet")
    default_b = str(numbers[0])
    default_a = str(numbers[1]) if len(numbers) > 1 else default_b
    a = request.GET.get("a") or default_a
    b = request.GET.get("b") or default_b
    label_a, spec_a, version_a = _side(workflow, a)
    label_b, spec_b, version_b = _side(workflow, b)
    agent_models = dict(Agent.objects.values_list("name", "model"))
    return render(
        request,
        "teams/diff.html",
        {
            "workflow": workflow,
            "numbers": numbers,
            "a": a,
            "b": b,
            "label_a": label_a,
            "label_b": label_b,
            "version_a": version_a,
            "version_b": version_b,
            "diff": diff_specs(spec_a, spec_b, agent_models=agent_models),
        },
    )


@require_POST
def version_rollback(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    """Publish an old version's spec and layout again as a new version, and make it the draft
    so the next publish does not undo the rollback. Runs keep pointing at their versions."""
    workflow = workflow_or_404(request, slug)
    old = version_or_404(workflow, number)
    spec = old.get_spec()
    if not _differs_from_latest(workflow, spec):
        messages.info(request, f"Version {old.number} is already what the latest version runs.")
        return redirect("teams:versions", slug=slug)
    try:
        version = workflow.publish(
            user=request.user,
            note=f"Rollback to version {old.number}",
            spec=spec,
            layout=old.layout,
        )
    except ValidationError as exc:
        messages.error(request, "Cannot roll back: " + "; ".join(exc.messages))
        return redirect("teams:versions", slug=slug)
    workflow.draft = spec
    workflow.layout = old.layout
    workflow.save(update_fields=["draft", "layout", "updated_at"])
    messages.success(request, f"Version {version.number} now runs what version {old.number} ran.")
    return redirect("teams:versions", slug=slug)
