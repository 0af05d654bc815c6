"""The run pages: the list, a run's live page, the start form, and the controls.

Every query starts from `Run.objects.for_user(request.user)` (the consumers use the same one), so
a run the user may not see is a 404 everywhere.
"""

import json
from datetime import UTC, datetime
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HTMX_STOP_POLLING, HttpResponseClientRedirect, trigger_client_event

from runs import costs, engine, fragments
from runs.forms import ForkForm, RunFilterForm, StartRunForm
from runs.models import Run
from teams.forms import RunInputForm
from teams.models import Workflow
from teams.spec import node_map
from teams.views import (
    draft_spec,
    editor_choices,
    spec_problems,
    version_or_404,
    workflow_or_404,
)

PAGE_SIZE = 25
POLL_BATCH = 200
CONTROL_ACTIONS = {
    "cancel": (engine.cancel_run, "Cancellation requested."),
    "pause": (engine.pause_run, "Run paused."),
    "resume": (engine.resume_run, "Run resumed."),
    "retry": (engine.retry_run, "Retrying the failed step."),
}


def _get_run_for_user(request: HttpRequest, pk: int) -> Run:
    runs = Run.objects.for_user(request.user).select_related(
        "workflow", "version", "started_by", "forked_from_step"
    )
    return get_object_or_404(runs, pk=pk)


def _redirect(request: HttpRequest, url: str) -> HttpResponse:
    if request.htmx:
        return HttpResponseClientRedirect(url)
    return HttpResponseRedirect(url)  # redirect() would look "next=inbox" up as a view name


@require_GET
def run_list(request: HttpRequest) -> HttpResponse:
    form = RunFilterForm(request.GET or None, user=request.user)
    runs = form.filter(Run.objects.for_user(request.user))
    cursor, newer = _parse_cursor(request.GET.get("cursor", "")), request.GET.get("dir") == "newer"
    rows, has_newer, has_older = _keyset_page(runs, cursor, newer)
    filters = {k: v for k, v in request.GET.items() if k not in ("cursor", "dir") and v}
    # Only the first page takes new runs at its top; other pages only refresh their rows.
    live_query = urlencode({**filters, **({"inserts": "0"} if has_newer else {})})
    context = {
        "form": form,
        "rows": [fragments.run_row_context(run) for run in rows],
        "newer_url": _page_url(filters, rows[0], "newer") if has_newer and rows else "",
        "older_url": _page_url(filters, rows[-1], "older") if has_older and rows else "",
        "first_url": reverse("runs:list") + "?" + urlencode(filters) if has_newer else "",
        "live_query": live_query,
        "stop_everything": engine.stop_everything_on(),
    }
    template = "runs/list.html#results" if request.htmx and not request.htmx.boosted else None
    return render(request, template or "runs/list.html", context)


def _keyset_page(runs, cursor: tuple[datetime, int] | None, newer: bool):
    """One page in (created_at, id) order without OFFSET or COUNT: the index on created_at
    (alone or after status/workflow/started_by) serves every page in constant time."""
    # The JSON columns can be large and the rows never show them (nor should DISTINCT compare them).
    runs = runs.select_related("workflow", "version", "started_by").defer(
        "input",
        "state",
        "result",
        "budget",
        "overrides",
        "edge_counts",
        "version__spec",
        "version__layout",
        "workflow__draft",
        "workflow__layout",
    )
    if cursor is None:
        rows = list(runs.order_by("-created_at", "-id")[: PAGE_SIZE + 1])
        return rows[:PAGE_SIZE], False, len(rows) > PAGE_SIZE
    created_at, pk = cursor
    if newer:
        rows = list(
            runs.filter(created_at__gte=created_at)
            .exclude(created_at=created_at, pk__lte=pk)
            .order_by("created_at", "id")[: PAGE_SIZE + 1]
        )
        if len(rows) <= PAGE_SIZE:  # back at the newest runs: show a full first page
            return _keyset_page(runs, None, False)
        return list(reversed(rows[:PAGE_SIZE])), True, True
    rows = list(
        runs.filter(created_at__lte=created_at)
        .exclude(created_at=created_at, pk__gte=pk)
        .order_by("-created_at", "-id")[: PAGE_SIZE + 1]
    )
    return rows[:PAGE_SIZE], True, len(rows) > PAGE_SIZE


def _parse_cursor(value: str) -> tuple[datetime, int] | None:
    stamp, _, pk = value.rpartition("~")
    try:
        created_at = datetime.fromisoformat(stamp)
        number = int(pk)
    except ValueError:
        return None
    if timezone.is_naive(created_at):
        created_at = created_at.replace(tzinfo=UTC)
    return created_at, number


def _page_url(filters: dict, run: Run, direction: str) -> str:
    cursor = f"{run.created_at.isoformat()}~{run.pk}"
    return reverse("runs:list") + "?" + urlencode({**filters, "cursor": cursor, "dir": direction})


@require_GET
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = _get_run_for_user(request, pk)
    # run.last_seq was read with the run, before the steps: any later change has a larger seq
    # and the page's socket replays it.
    context = fragments.detail_context(run, last_seq=run.last_seq)
    context["stop_everything"] = engine.stop_everything_on()
    context["cost_breakdown"] = costs.run_breakdown(run)
    return render(request, "runs/detail.html", context)


@require_GET
def run_events(request: HttpRequest, pk: int) -> HttpResponse:
    """The polling fallback: the fragments of the events after `after`, as the socket sends
    them. Answers 286 (htmx: stop polling) once the run is over and the page has caught up."""
    run = _get_run_for_user(request, pk)
    try:
        after = max(0, int(request.GET.get("after", "0")))
    except ValueError:
        after = 0
    events = list(run.events.filter(seq__gt=after).order_by("seq")[:POLL_BATCH])
    caught_up = (events[-1].seq if events else after) >= run.last_seq
    status = HTMX_STOP_POLLING if caught_up and not run.is_active else 200
    return HttpResponse(fragments.render_events(events), status=status)


@require_http_methods(["GET", "POST"])
def run_start(request: HttpRequest) -> HttpResponse:
    workflows = (
        Workflow.objects.for_user(request.user)
        .filter(versions__isnull=False)
        .distinct()
        .order_by("name")
    )
    workflow = version = form = None
    if request.GET.get("workflow"):
        workflow = get_object_or_404(workflows, slug=request.GET["workflow"])
        versions = workflow.versions.order_by("-number")
        number = request.GET.get("version", "")
        version = (
            get_object_or_404(versions, number=number)
            if number.isascii() and number.isdigit()
            else None
        )
        version = version or versions.first()
        schema = version.get_spec().get("input_schema") or {}
        form = StartRunForm(request.POST or None, schema=schema, prefix="in")
    elif request.method == "POST":
        raise Http404("Choose a workflow first.")
    if form is not None and request.method == "POST" and form.is_valid():
        try:
            run = engine.start_run(version, form.run_input(), request.user)
        except engine.RunInputError as exc:
            form.add_input_errors(exc.messages)
        else:
            return _redirect(request, run.get_absolute_url())
    context = {
        "workflows": workflows,
        "workflow": workflow,
        "versions": workflow.versions.order_by("-number") if workflow else [],
        "version": version,
        "form": form,
    }
    return render(request, "runs/start.html", context)


@require_POST
def run_control(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    if action not in CONTROL_ACTIONS:
        raise Http404
    run = _get_run_for_user(request, pk)
    function, done = CONTROL_ACTIONS[action]
    try:
        function(run, request.user)
    except engine.RunControlError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, done)
    return _redirect(request, run.get_absolute_url())


@require_http_methods(["GET", "POST"])
def step_fork(request: HttpRequest, pk: int, step_pk: int) -> HttpResponse:
    run = _get_run_for_user(request, pk)
    step = get_object_or_404(run.steps.select_related("agent"), pk=step_pk)
    node = node_map(run.version.get_spec()).get(step.node_id, {})
    override = (run.overrides or {}).get(step.node_id) or {}
    initial = {
        "input": run.input,
        "prompt": override.get("prompt") or node.get("prompt", ""),
        "model": override.get("model") or step.model or (step.agent.model if step.agent else ""),
    }
    form = ForkForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        changed_input = form.cleaned_data["input"] if "input" in form.changed_data else None
        try:
            fork = engine.fork_run(
                step,
                request.user,
                input=changed_input,
                overrides=form.overrides(step.node_id) or None,
            )
        except engine.RunInputError as exc:
            for message in exc.messages:
                form.add_error("input", message)
        except engine.RunControlError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Forked run #{run.pk} from step {step.node_id}.")
            return _redirect(request, fork.get_absolute_url())
    return render(request, "runs/fork.html", {"run": run, "step": step, "node": node, "form": form})


@require_POST
def stop_everything(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied("Only staff may stop everything.")
    on = request.POST.get("on") == "1"
    engine.set_stop_everything(on, request.user)
    if on:
        messages.warning(request, "Everything is stopped: active runs pause, no new step starts.")
    else:
        messages.success(request, "The global stop is released; paused runs can be resumed.")
    url = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(url, {request.get_host()}, request.is_secure()):
        url = reverse("runs:list")
    return _redirect(request, url)


# --- run from the editor --------------------------------------------------------------------
# The editor's run panel lives here, not in teams: starting runs and reading their steps is this
# app's business, and `teams` never imports `runs`.


@require_http_methods(["GET", "POST"])
def editor_run(request: HttpRequest, slug: str) -> HttpResponse:
    """GET: the run form (input fields from the chosen version's input schema). POST: start a
    run of that version; "draft" publishes the draft first (note "test run") unless the latest
    version already has the same spec."""
    workflow = workflow_or_404(request, slug)
    numbers = list(workflow.versions.order_by("-number").values_list("number", flat=True))
    chosen = request.POST.get("version") or request.GET.get("version") or "draft"
    if chosen != "draft":
        spec = version_or_404(workflow, chosen).get_spec()
    else:
        spec = draft_spec(workflow)
    form = RunInputForm(
        request.POST if request.method == "POST" else None, schema=spec.get("input_schema") or {}
    )
    context = {"workflow": workflow, "numbers": numbers, "chosen": chosen, "form": form}
    if request.method == "GET" or not form.is_valid():
        return render(request, "teams/run_panel.html", context)
    if chosen == "draft":
        problems = spec_problems(spec, editor_choices(request, workflow))
        if problems:
            context["run_errors"] = ["Fix the draft's problems first."] + [str(p) for p in problems]
            return render(request, "teams/run_panel.html", context)
        version = workflow.latest_version()
        if version is None or version.get_spec() != spec:
            version = workflow.publish(user=request.user, note="test run", spec=spec)
    else:
        version = version_or_404(workflow, chosen)
    try:
        run = engine.start_run(version, form.input(), request.user)
    except engine.RunInputError as exc:
        context["run_errors"] = exc.messages
        return render(request, "teams/run_panel.html", context)
    context.update(
        run=run,
        version=version,
        numbers=list(workflow.versions.order_by("-number").values_list("number", flat=True)),
    )
    response = render(request, "teams/run_panel.html", context)
    # After the swap: the run card the watcher fills in is part of this response.
    return trigger_client_event(
        response,
        "baton:run-started",
        {
            "run_id": run.pk,
            "version": version.number,
            "status_url": reverse("runs:editor_run_status", args=[slug, run.pk]),
            "run_url": run.get_absolute_url(),
        },
        after="swap",
    )


@require_GET
def editor_run_status(request: HttpRequest, slug: str, run_id: int) -> JsonResponse:
    """What the canvas needs to light up a run: the run's status and each node's latest step."""
    workflow = workflow_or_404(request, slug)
    run = get_object_or_404(
        Run.objects.for_user(request.user).select_related("version"),
        pk=run_id,
        workflow=workflow,
    )
    nodes: dict[str, dict] = {}
    for step in run.steps.order_by("iteration", "id").only(
        "node_id", "iteration", "status", "error"
    ):
        nodes[step.node_id] = {
            "status": step.status,
            "iteration": step.iteration,
            "error": step.error[:300],
        }
    return JsonResponse(
        {
            "run": {
                "id": run.pk,
                "status": run.status,
                "status_label": run.get_status_display(),
                "active": run.is_active,
                "error": run.error,
                "blocked_on": run.blocked_on,
                "version": run.version.number,
                "url": run.get_absolute_url(),
                "result": _preview(run.result),
            },
            "nodes": nodes,
        }
    )


def _preview(value: Any, limit: int = 2000) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"
